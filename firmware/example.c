/* The streaming C API in one program: a device computes its gradient chunk by chunk (as
   backpropagation produces it, layer by layer), feeds each chunk to the streaming encoder and
   sends the message; a server decodes and sums. Only one chunk of the gradient is ever in
   RAM, and the residual and velocity are kept as int8 with one scale per 32 elements.
   Built and run on the host and on the mps2 boards by tests/test_mcu.py, which checks that
   both print the same, and that every message equals iotcompress.StreamingCompressor's for
   the same gradient and decodes on the host. docs/mcu.md shows this file. */
#include <stdio.h>

#include "iotcompress.h"

#define NUMEL 1000u /* parameters of the model */
#define CHUNK 100u  /* gradient elements the device holds at once */

/* Device side: everything static, sized at compile time. */
static IotcompressStream stream;
static uint8_t state[IOTCOMPRESS_STREAM_STATE_LEN(NUMEL, IOTCOMPRESS_STATE_INT8, 1)];
static uint8_t message[IOTCOMPRESS_MAX_MESSAGE_LEN(NUMEL, IOTCOMPRESS_VALUE_BITS_INT8)];

/* Server side. */
static float sum[NUMEL];

static int check(IotcompressStatus rc, const char *what)
{
    if (rc != IOTCOMPRESS_OK) {
        printf("%s: %s (%s)\n", what, iotcompress_error_name(rc), iotcompress_error_message(rc));
        return 1;
    }
    return 0;
}

/* Stands in for the radio: prints the bytes, and the server decodes them right away. */
static int send_bytes(const uint8_t *bytes, size_t len)
{
    IotcompressHeader header;
    printf("MSG ");
    for (size_t i = 0; i < len; i++) printf("%02x", bytes[i]);
    printf("\n");
    if (check(iotcompress_decode_add(bytes, len, sum, NUMEL, 1.0f, &header), "decode_add")) return 1;
    printf("sent %u bytes: %u of %u entries\n", (unsigned)len, (unsigned)header.nnz,
           (unsigned)header.numel);
    return 0;
}

/* Stands in for backpropagation: the gradient of parameters first .. first + len - 1. */
static void compute_gradient(float *grad, uint32_t first, uint32_t len, uint32_t step)
{
    for (uint32_t j = 0; j < len; j++) {
        uint32_t x = ((first + j) * 2654435761u) ^ (step * 40503u);
        grad[j] = (float)(x % 2001u) / 1000.0f - 1.0f;
    }
}

int main(void)
{
    IotcompressStreamConfig config;
    iotcompress_stream_config_default(&config);
    config.numel = NUMEL;
    config.threshold = 0.9f;   /* Wt of the first message */
    config.target_count = 50;  /* then Wt adapts towards 50 entries (5 %) a message */
    config.quant = IOTCOMPRESS_QUANT_INT8;
    config.momentum_kind = IOTCOMPRESS_MOMENTUM_VANILLA;
    config.momentum = 0.9f;
    config.state_format = IOTCOMPRESS_STATE_INT8;

    IotcompressStreamSizes sizes;
    if (check(iotcompress_stream_sizes(&config, &sizes), "sizes")) return 1;
    if (sizes.state_len != sizeof state || sizes.full_message_len > sizeof message) return 1;
    if (check(iotcompress_stream_init(&stream, &config), "init")) return 1;

    IotcompressStreamBuffers bufs = { state, sizeof state, message, sizeof message };
    float chunk[CHUNK];
    for (uint32_t step = 0; step < 5; step++) {
        if (check(iotcompress_stream_begin(&stream, &bufs), "begin")) return 1;
        for (uint32_t first = 0; first < NUMEL; first += CHUNK) {
            compute_gradient(chunk, first, CHUNK, step);
            if (check(iotcompress_stream_feed(&stream, &bufs, chunk, CHUNK), "feed")) return 1;
        }
        IotcompressStreamInfo info;
        if (check(iotcompress_stream_finish(&stream, &bufs, &info), "finish")) return 1;
        if (send_bytes(message, info.bytes)) return 1;
    }
    return 0;
}
