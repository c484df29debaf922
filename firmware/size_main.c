/* Size, stack and speed probe: a minimal firmware without libc that runs one configuration
   of the library (chosen by -DVARIANT_<name>) and reports over semihosting:
     SIZE variant n bytes nnz stack_compress stack_decode ticks_compress ticks_decode
          spin_ticks spin_insns
   VARIANT_baseline calls nothing of the library: the flash/RAM of the other variants minus
   the baseline's is what the library adds. VARIANT_stream_int8 (f32 state) and
   VARIANT_stream_int8_state8 (int8 state) use only the streaming encoder.
   firmware/size_report.py builds the table. */
#include <stdint.h>
#include <string.h>

#include "fw.h"
#include "iotcompress.h"

#ifndef SIZE_N
#define SIZE_N 4096u
#endif
#define STEPS 3u
#define SPIN 100000u /* fw_spin(SPIN) runs 2 * SPIN loop instructions */

#if defined(VARIANT_stream_int8) || defined(VARIANT_stream_int8_state8)
#define STREAM 1
#define CHUNK 256u
#ifdef VARIANT_stream_int8_state8
#define STATE_FORMAT IOTCOMPRESS_STATE_INT8
#else
#define STATE_FORMAT IOTCOMPRESS_STATE_F32
#endif
#endif

static float grad[SIZE_N];
#if defined(STREAM)
static uint8_t sstate[IOTCOMPRESS_STREAM_STATE_LEN(SIZE_N, STATE_FORMAT, 0)];
static uint8_t msg[IOTCOMPRESS_MAX_MESSAGE_LEN(SIZE_N, IOTCOMPRESS_VALUE_BITS_INT8)];
static IotcompressStream stream;
#elif !defined(VARIANT_baseline)
static float residual[SIZE_N];
static uint32_t scratch[SIZE_N];
static uint8_t msg[IOTCOMPRESS_MAX_MESSAGE_LEN(SIZE_N, IOTCOMPRESS_VALUE_BITS_INT8)];
static IotcompressCompressor state;
#endif

static char line[256];
static int pos;

static void put(const char *s)
{
    while (*s && pos < (int)sizeof line - 1) line[pos++] = *s++;
}

static void put_u32(const char *key, uint32_t v)
{
    char num[12];
    put(" ");
    put(key);
    put("=");
    fw_dec(num, v);
    put(num);
}

/* Gradient bit patterns from integer arithmetic only (no soft-float in the C code): random
   sign, exponent 2^-7 .. 2^-1, random mantissa. */
static void fill_gradient(uint32_t step)
{
    uint32_t x = 12345u + step * 7919u;
    for (uint32_t i = 0; i < SIZE_N; i++) {
        x = x * 1664525u + 1013904223u;
        uint32_t bits = (x & 0x80000000u) | ((120u + ((x >> 23) & 7u)) << 23) | (x & 0x007fffffu);
        memcpy(&grad[i], &bits, 4);
    }
}

int main(void)
{
    uint32_t bytes = 0, nnz = 0, stack_compress = 0, stack_decode = 0;
    uint32_t ticks_compress = 0, ticks_decode = 0, t0, t1;
    IotcompressStatus rc = IOTCOMPRESS_OK;

    fw_systick_start();
    t0 = fw_systick();
    fw_spin(SPIN);
    t1 = fw_systick();
    uint32_t spin_ticks = fw_ticks_between(t0, t1);

#if defined(STREAM)
    /* The streaming encoder: the same threshold (and so the same entries) as the batch
       threshold probe, the gradient fed in chunks of CHUNK elements. */
    IotcompressStreamConfig config;
    iotcompress_stream_config_default(&config);
    config.numel = SIZE_N;
    config.threshold = 1.8f;
    config.quant = IOTCOMPRESS_QUANT_INT8;
    config.state_format = STATE_FORMAT;
    rc = iotcompress_stream_init(&stream, &config);
    IotcompressStreamBuffers bufs = { sstate, sizeof sstate, msg, sizeof msg };
    for (uint32_t s = 0; s < STEPS && rc == IOTCOMPRESS_OK; s++) {
        IotcompressStreamInfo info;
        uint32_t ticks = 0;
        fill_gradient(s);
        uint32_t sp = fw_sp();
        fw_stack_paint();
        t0 = fw_systick();
        rc = iotcompress_stream_begin(&stream, &bufs);
        for (uint32_t at = 0; at < SIZE_N && rc == IOTCOMPRESS_OK; at += CHUNK) {
            uint32_t len = SIZE_N - at < CHUNK ? SIZE_N - at : CHUNK;
            rc = iotcompress_stream_feed(&stream, &bufs, &grad[at], len);
        }
        if (rc == IOTCOMPRESS_OK) rc = iotcompress_stream_finish(&stream, &bufs, &info);
        t1 = fw_systick();
        ticks += fw_ticks_between(t0, t1);
        uint32_t used = sp - fw_stack_lowest();
        if (used > stack_compress) stack_compress = used;
        ticks_compress = ticks; /* the last step: steady state */
        bytes = info.bytes;
        nnz = info.nnz;
    }
#elif !defined(VARIANT_baseline)
    IotcompressConfig config;
    iotcompress_config_default(&config);
#if defined(VARIANT_topk_sign)
    config.selection = IOTCOMPRESS_SELECT_TOPK;
    config.density = 0.01;
    config.exact = 1u;
    config.quant = IOTCOMPRESS_QUANT_SIGN;
#else
    config.selection = IOTCOMPRESS_SELECT_THRESHOLD;
    config.threshold = 1.8f;
    config.quant = IOTCOMPRESS_QUANT_INT8;
#endif
    rc = iotcompress_init(&state, &config, SIZE_N);
    IotcompressBuffers bufs = { residual, SIZE_N, NULL, 0, scratch, SIZE_N };
    for (uint32_t s = 0; s < STEPS && rc == IOTCOMPRESS_OK; s++) {
        IotcompressStepInfo info = { 0, 0 };
        fill_gradient(s);
        uint32_t sp = fw_sp();
        fw_stack_paint();
        t0 = fw_systick();
        rc = iotcompress_compress(&state, &bufs, grad, SIZE_N, msg, sizeof msg, &info);
        t1 = fw_systick();
        uint32_t used = sp - fw_stack_lowest();
        if (used > stack_compress) stack_compress = used;
        ticks_compress = fw_ticks_between(t0, t1); /* the last step: steady state */
        bytes = info.bytes;
        nnz = info.nnz;
    }
#if defined(VARIANT_threshold_int8_decode)
    if (rc == IOTCOMPRESS_OK) {
        memset(grad, 0, sizeof grad);
        uint32_t sp = fw_sp();
        fw_stack_paint();
        t0 = fw_systick();
        rc = iotcompress_decode_add(msg, bytes, grad, SIZE_N, 1.0f, NULL);
        t1 = fw_systick();
        stack_decode = sp - fw_stack_lowest();
        ticks_decode = fw_ticks_between(t0, t1);
    }
#endif
#else
    fill_gradient(0);
#endif

    put("SIZE");
    put_u32("n", SIZE_N);
    put_u32("status", (uint32_t)rc);
    put_u32("bytes", bytes);
    put_u32("nnz", nnz);
    put_u32("stack_compress", stack_compress);
    put_u32("stack_decode", stack_decode);
    put_u32("ticks_compress", ticks_compress);
    put_u32("ticks_decode", ticks_decode);
    put_u32("spin_ticks", spin_ticks);
    put_u32("spin_insns", 2u * SPIN);
    put_u32("grad0", grad[0] != 0.0f); /* keeps the gradient alive in the baseline */
    put("\n");
    line[pos] = 0;
    fw_write0(line);
    return rc == IOTCOMPRESS_OK ? 0 : 1;
}
