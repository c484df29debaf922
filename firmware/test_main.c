/* Firmware test: runs the compressor over the cases of vectors.h (generated from
   tests/vectors/cases.json by gen_vectors.py) and prints every message in hex over
   semihosting; decodes the host-made golden messages and prints the decoded values.
   tests/test_mcu.py compares everything with the host library. Static buffers only. */
#include <stdio.h>
#include <string.h>

#include "fw.h"
#include "iotcompress.h"
#include "vectors.h"

#ifndef FW_BOARD
#define FW_BOARD "unknown"
#endif

static float residual[FW_MAX_NUMEL];
static float velocity[FW_MAX_VELOCITY];
static uint32_t scratch[FW_MAX_NUMEL];
static uint8_t msg[FW_MSG_CAP];
static IotcompressCompressor state;

static int failures;
static uint32_t peak_compress, peak_decode;

static void fail(const char *name, const char *what, IotcompressStatus rc)
{
    printf("ERR %s %s %s\n", name, what, iotcompress_error_name(rc));
    failures++;
}

static void put_hex_bytes(const uint8_t *p, size_t n)
{
    char line[65];
    size_t k = 0;
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        line[k++] = digits[p[i] >> 4];
        line[k++] = digits[p[i] & 15u];
        if (k == 64) {
            line[k] = 0;
            fputs(line, stdout);
            k = 0;
        }
    }
    line[k] = 0;
    fputs(line, stdout);
}

static uint32_t f32_bits(float v)
{
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
}

static uint32_t checksum_floats(const float *v, uint32_t n)
{
    uint32_t h = 2166136261u, bits;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(&bits, &v[i], 4);
        h = (h ^ bits) * 16777619u;
    }
    return h;
}

static void run_case(const struct fw_case *c)
{
    IotcompressSizes sz;
    IotcompressStatus rc = iotcompress_sizes(&c->config, c->numel, &sz);
    if (rc != IOTCOMPRESS_OK) { fail(c->name, "sizes", rc); return; }
    printf("CASE %s numel %lu velocity %lu scratch %lu max_message %lu\n", c->name,
           (unsigned long)c->numel, (unsigned long)sz.velocity_len, (unsigned long)sz.scratch_len,
           (unsigned long)sz.max_message_len);
    if (sz.residual_len > FW_MAX_NUMEL || sz.velocity_len > FW_MAX_VELOCITY ||
        sz.scratch_len > FW_MAX_NUMEL || sz.max_message_len > FW_MSG_CAP) {
        printf("ERR %s buffers too small for this case\n", c->name);
        failures++;
        return;
    }
    rc = iotcompress_init(&state, &c->config, c->numel);
    if (rc != IOTCOMPRESS_OK) { fail(c->name, "init", rc); return; }
    memset(residual, 0, sizeof residual);
    memset(velocity, 0, sizeof velocity);
    IotcompressBuffers bufs = {
        residual, sz.residual_len, sz.velocity_len ? velocity : NULL, sz.velocity_len,
        scratch,  sz.scratch_len,
    };

    for (uint32_t s = 0; s < c->n_steps; s++) {
        IotcompressStepInfo info;
        uint32_t sp = fw_sp();
        fw_stack_paint();
        rc = iotcompress_compress(&state, &bufs, c->steps[s].grad, c->numel, msg, sizeof msg, &info);
        uint32_t used = sp - fw_stack_lowest();
        if (used > peak_compress) peak_compress = used;
        if (rc != IOTCOMPRESS_OK) { fail(c->name, "compress", rc); return; }
        printf("MSG %s %lu nnz %lu ", c->name, (unsigned long)s, (unsigned long)info.nnz);
        put_hex_bytes(msg, info.bytes);
        fputs("\n", stdout);
    }

    /* Decode the host-made messages of this case into one dense sum. */
    if (!c->steps[0].msg) return;
    memset(residual, 0, sizeof residual);
    for (uint32_t s = 0; s < c->n_steps; s++) {
        const struct fw_step *st = &c->steps[s];
        IotcompressHeader h;
        rc = iotcompress_parse(st->msg, st->msg_len, c->numel, &h);
        if (rc != IOTCOMPRESS_OK) { fail(c->name, "parse", rc); return; }
        printf("HDR %s %lu %lu %lu %lu %lu %lu %lu %08lx %08lx %lu %lu %lu %lu\n", c->name,
               (unsigned long)s, (unsigned long)h.numel, (unsigned long)h.nnz,
               (unsigned long)h.quant, (unsigned long)h.qsgd_levels,
               (unsigned long)h.index_coding, (unsigned long)h.rice_k,
               (unsigned long)f32_bits(h.scale),
               (unsigned long)h.stream, (unsigned long)h.header_len,
               (unsigned long)h.index_len, (unsigned long)h.values_len,
               (unsigned long)h.message_len);
        uint32_t sp = fw_sp();
        fw_stack_paint();
        rc = iotcompress_decode_add(st->msg, st->msg_len, residual, c->numel, 1.0f, NULL);
        uint32_t used = sp - fw_stack_lowest();
        if (used > peak_decode) peak_decode = used;
        if (rc != IOTCOMPRESS_OK) { fail(c->name, "decode_add", rc); return; }
    }
    printf("DEC %s", c->name);
    for (uint32_t i = 0; i < c->numel; i++) {
        uint32_t bits;
        memcpy(&bits, &residual[i], 4);
        if (bits) printf(" %lu:%08lx", (unsigned long)i, (unsigned long)bits);
    }
    fputs("\n", stdout);

    /* A corrupted message is refused and leaves the output alone. */
    uint32_t len = c->steps[0].msg_len;
    memcpy(msg, c->steps[0].msg, len);
    msg[len - 1] ^= 0x01u;
    uint32_t before = checksum_floats(residual, c->numel);
    rc = iotcompress_decode_add(msg, len, residual, c->numel, 1.0f, NULL);
    printf("CORRUPT %s %s %s\n", c->name, iotcompress_error_name(rc),
           checksum_floats(residual, c->numel) == before ? "unchanged" : "changed");
}

int main(void)
{
    printf("BOARD %s\n", FW_BOARD);
    printf("ABI state_size %lu sizeof %lu wire_version %lu\n",
           (unsigned long)iotcompress_state_size(), (unsigned long)sizeof(IotcompressCompressor),
           (unsigned long)IOTCOMPRESS_WIRE_VERSION);
    if (iotcompress_state_size() != sizeof(IotcompressCompressor)) failures++;
    for (uint32_t i = 0; i < FW_N_CASES; i++) run_case(&fw_cases[i]);
    printf("STACK compress %lu decode %lu reserved %lu\n", (unsigned long)peak_compress,
           (unsigned long)peak_decode, (unsigned long)fw_stack_size());
    printf("DONE failures %d\n", failures);
    fflush(stdout);
    return failures ? 1 : 0;
}
