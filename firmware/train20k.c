/* The 20 kB-SRAM budget example: a Cortex-M3 (QEMU mps2-an385, linked with
   boards/mps2-an385-20k.ld: 20 KiB of RAM in all, the stack included) trains a 64-32-10
   multilayer perceptron (2410 parameters) on a synthetic ten-class problem and sends every
   gradient as a compressed message. The gradient is never held whole: it is computed one
   neuron's weights at a time (65 or 33 floats) and fed to the streaming encoder; the
   error-feedback residual is kept as int8 with one scale per 32 elements (2714 bytes instead
   of 9640). The "server" decodes each message into the weights (SGD on the decoded
   gradient). No libc: output over semihosting, all buffers static.

   tests/test_mcu.py runs it, builds the same file for the host (-DHOST) and requires the same
   output byte for byte, decodes every message with the host library, checks that the model
   learned, and checks the RAM budget from the ELF and the measured peak stack. */
#include <stdint.h>
#include <string.h>

#include "iotcompress.h"

#ifdef HOST
#include <stdio.h>
static void out_str(const char *s) { fputs(s, stdout); }
static void stack_paint(void) {}
static uint32_t stack_peak(void) { return 0u; }
#else
#include "fw.h"
static void out_str(const char *s) { fw_write0(s); }
static uint32_t stack_top;
static void stack_paint(void)
{
    stack_top = fw_sp();
    fw_stack_paint();
}
static uint32_t stack_peak(void) { return stack_top - fw_stack_lowest(); }
#endif

#define IN 64u
#define HID 32u
#define OUT 10u
#define W2_AT (HID * (IN + 1u))               /* layer 2 starts here */
#define NUMEL (W2_AT + OUT * (HID + 1u))      /* 2410 parameters */
#define BATCH 8u
#define STEPS 200u
#define LR 0.5f
#define MSG_CAP 512u                          /* a radio packet; entries beyond wait */
#define TEST_N 200u
#define TEST_FIRST 1000000u

/* The model: layer 1 unit j is w[j*65 .. j*65+63] and its bias w[j*65+64]; layer 2 unit k is
   w[W2_AT + k*33 ..] and its bias at +32. */
static float w[NUMEL];
/* The streaming compressor: residual as int8 blocks, and the output buffer. */
static IotcompressStream stream;
static uint8_t state[IOTCOMPRESS_STREAM_STATE_LEN(NUMEL, IOTCOMPRESS_STATE_INT8, 0)];
static uint8_t msg[MSG_CAP];
/* One mini-batch's activations and error signals, and one gradient chunk. */
static float hid[BATCH][HID], dhid[BATCH][HID], dout[BATCH][OUT];
static float x[IN], chunk[IN + 1u];

/* --- output without libc ------------------------------------------------------------- */

static void out_u32(uint32_t v)
{
    char buf[11];
    int n = 10;
    buf[n] = 0;
    do {
        buf[--n] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    out_str(buf + n);
}

static void out_hex(const uint8_t *p, uint32_t len)
{
    static const char digits[] = "0123456789abcdef";
    char buf[129];
    while (len) {
        uint32_t n = len < 64u ? len : 64u;
        for (uint32_t i = 0; i < n; i++) {
            buf[2 * i] = digits[p[i] >> 4];
            buf[2 * i + 1] = digits[p[i] & 15u];
        }
        buf[2 * n] = 0;
        out_str(buf);
        p += n;
        len -= n;
    }
}

static void out_status(const char *what, IotcompressStatus rc)
{
    out_str("ERR ");
    out_str(what);
    out_str(" ");
    out_str(iotcompress_error_name(rc));
    out_str("\n");
}

/* --- data and arithmetic from IEEE basic operations only (same bits on host and device) -- */

static uint32_t hash(uint32_t v)
{
    v ^= v >> 16;
    v *= 0x7feb352du;
    v ^= v >> 15;
    v *= 0x846ca68bu;
    v ^= v >> 16;
    return v;
}

/* Uniform in [-1, 1), exactly representable. */
static float unit(uint32_t h) { return (float)(h & 0xffffu) / 32768.0f - 1.0f; }

static uint32_t label_of(uint32_t sample) { return hash(sample * 2u + 1u) % OUT; }

/* Input i of a sample: its class's 8x8 bitmap plus noise. */
static float input(uint32_t sample, uint32_t i)
{
    float proto = (hash(label_of(sample) * 131u + i + 7u) & 1u) ? 1.0f : 0.0f;
    return proto + 2.0f * unit(hash(sample * 64u + i + 0x9e3779b9u));
}

/* e^t for t <= 0 (softmax subtracts the maximum): 2^k times a degree-6 polynomial. */
static float exp_neg(float t)
{
    if (t < -80.0f) return 0.0f;
    int k = (int)(t * 1.44269504f - 0.5f);
    float r = t - (float)k * 0.693147181f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666667f + r * (0.0416666667f + r * (0.00833333333f + r * 0.00138888889f)))));
    uint32_t bits = (uint32_t)(127 + k) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* --- the model ---------------------------------------------------------------------------- */

/* Forward pass of one sample: hidden activations into h, class probabilities into p;
   returns the predicted class. */
static uint32_t forward(uint32_t sample, float *h, float *p)
{
    for (uint32_t i = 0; i < IN; i++) x[i] = input(sample, i);
    for (uint32_t j = 0; j < HID; j++) {
        const float *wj = &w[j * (IN + 1u)];
        float acc = wj[IN];
        for (uint32_t i = 0; i < IN; i++) acc += wj[i] * x[i];
        h[j] = acc > 0.0f ? acc : 0.0f;
    }
    uint32_t best = 0;
    for (uint32_t k = 0; k < OUT; k++) {
        const float *wk = &w[W2_AT + k * (HID + 1u)];
        float acc = wk[HID];
        for (uint32_t j = 0; j < HID; j++) acc += wk[j] * h[j];
        p[k] = acc;
        if (acc > p[best]) best = k;
    }
    float max = p[best], sum = 0.0f;
    for (uint32_t k = 0; k < OUT; k++) {
        p[k] = exp_neg(p[k] - max);
        sum += p[k];
    }
    for (uint32_t k = 0; k < OUT; k++) p[k] = p[k] / sum;
    return best;
}

static uint32_t test_correct(void)
{
    float h[HID], p[OUT];
    uint32_t correct = 0;
    for (uint32_t t = 0; t < TEST_N; t++)
        correct += forward(TEST_FIRST + t, h, p) == label_of(TEST_FIRST + t);
    return correct;
}

static void report_accuracy(uint32_t step)
{
    out_str("ACC ");
    out_u32(step);
    out_str(" ");
    out_u32(test_correct());
    out_str(" ");
    out_u32(TEST_N);
    out_str("\n");
}

/* One training step: forward and backward over the mini-batch, then the gradient neuron by
   neuron into the streaming encoder. Returns the message length (0 on error). */
static uint32_t train_step(uint32_t step, const IotcompressStreamBuffers *bufs)
{
    uint32_t first = step * BATCH;
    for (uint32_t b = 0; b < BATCH; b++) {
        float p[OUT];
        forward(first + b, hid[b], p);
        uint32_t y = label_of(first + b);
        for (uint32_t k = 0; k < OUT; k++) dout[b][k] = (p[k] - (k == y ? 1.0f : 0.0f)) / (float)BATCH;
        for (uint32_t j = 0; j < HID; j++) {
            float acc = 0.0f;
            for (uint32_t k = 0; k < OUT; k++) acc += w[W2_AT + k * (HID + 1u) + j] * dout[b][k];
            dhid[b][j] = hid[b][j] > 0.0f ? acc : 0.0f;
        }
    }
    IotcompressStatus rc = iotcompress_stream_begin(&stream, bufs);
    for (uint32_t j = 0; j < HID && rc == IOTCOMPRESS_OK; j++) {
        for (uint32_t i = 0; i <= IN; i++) chunk[i] = 0.0f;
        for (uint32_t b = 0; b < BATCH; b++) {
            for (uint32_t i = 0; i < IN; i++) chunk[i] += dhid[b][j] * input(first + b, i);
            chunk[IN] += dhid[b][j];
        }
        rc = iotcompress_stream_feed(&stream, bufs, chunk, IN + 1u);
    }
    for (uint32_t k = 0; k < OUT && rc == IOTCOMPRESS_OK; k++) {
        for (uint32_t j = 0; j <= HID; j++) chunk[j] = 0.0f;
        for (uint32_t b = 0; b < BATCH; b++) {
            for (uint32_t j = 0; j < HID; j++) chunk[j] += dout[b][k] * hid[b][j];
            chunk[HID] += dout[b][k];
        }
        rc = iotcompress_stream_feed(&stream, bufs, chunk, HID + 1u);
    }
    IotcompressStreamInfo info;
    if (rc == IOTCOMPRESS_OK) rc = iotcompress_stream_finish(&stream, bufs, &info);
    if (rc != IOTCOMPRESS_OK) {
        out_status("stream", rc);
        return 0;
    }
    out_str("MSG ");
    out_u32(step);
    out_str(" ");
    out_u32(info.nnz);
    out_str(" ");
    out_u32(info.selected);
    out_str(" ");
    out_hex(msg, (uint32_t)info.bytes);
    out_str("\n");
    /* The server's side: SGD with the decoded gradient. */
    rc = iotcompress_decode_add(msg, info.bytes, w, NUMEL, -LR, NULL);
    if (rc != IOTCOMPRESS_OK) {
        out_status("decode_add", rc);
        return 0;
    }
    return (uint32_t)info.bytes;
}

int main(void)
{
    stack_paint();
    for (uint32_t i = 0; i < NUMEL; i++) {
        float fan_in = i < W2_AT ? 0.125f : 0.177f; /* about 1/sqrt(fan in) */
        w[i] = fan_in * unit(hash(i + 12345u));
    }
    IotcompressStreamConfig config;
    iotcompress_stream_config_default(&config);
    config.numel = NUMEL;
    config.threshold = 0.01f;
    config.target_count = 120u; /* 5 % of the parameters a message */
    config.quant = IOTCOMPRESS_QUANT_INT8;
    config.state_format = IOTCOMPRESS_STATE_INT8;
    IotcompressStatus rc = iotcompress_stream_init(&stream, &config);
    if (rc != IOTCOMPRESS_OK) {
        out_status("init", rc);
        return 1;
    }
    IotcompressStreamBuffers bufs = { state, sizeof state, msg, sizeof msg };
    out_str("MODEL ");
    out_u32(NUMEL);
    out_str(" ");
    out_u32((uint32_t)sizeof state);
    out_str(" ");
    out_u32(MSG_CAP);
    out_str("\n");
    report_accuracy(0);
    uint32_t total = 0;
    for (uint32_t step = 0; step < STEPS; step++) {
        uint32_t bytes = train_step(step, &bufs);
        if (bytes == 0) return 1;
        total += bytes;
        if ((step + 1u) % 50u == 0u) report_accuracy(step + 1u);
    }
    uint32_t digest = 2166136261u, bits;
    for (uint32_t i = 0; i < NUMEL; i++) {
        memcpy(&bits, &w[i], 4);
        digest = (digest ^ bits) * 16777619u;
    }
    out_str("DONE bytes ");
    out_u32(total);
    out_str(" weights ");
    out_u32(digest);
    out_str("\n");
    out_str("STACK ");
    out_u32(stack_peak());
    out_str("\n");
    return 0;
}
