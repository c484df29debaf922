/* The C API in one program: a device compresses a few gradient steps into static buffers and
   "sends" the bytes; a server decodes and sums them. Built and run on the host by
   tests/test_mcu.py; docs/mcu.md shows this file. */
#include <stdio.h>
#include <string.h>

#include "iotcompress.h"

#define NUMEL 1000u

/* Device side: everything static, sized at compile time (scratch never exceeds numel). */
static IotcompressCompressor compressor;
static float residual[NUMEL];
static float velocity[NUMEL];
static uint32_t scratch[IOTCOMPRESS_MAX_SCRATCH_LEN(NUMEL)];
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

/* Stands in for the radio: here the server decodes right away. */
static int send_bytes(const uint8_t *bytes, size_t len)
{
    IotcompressHeader header;
    if (check(iotcompress_decode_add(bytes, len, sum, NUMEL, 1.0f, &header), "decode_add")) return 1;
    printf("sent %u bytes: %u of %u entries\n", (unsigned)len, (unsigned)header.nnz,
           (unsigned)header.numel);
    return 0;
}

static void compute_gradient(float *grad, uint32_t step)
{
    for (uint32_t i = 0; i < NUMEL; i++) {
        uint32_t x = (i * 2654435761u) ^ (step * 40503u);
        grad[i] = (float)(x % 2001u) / 1000.0f - 1.0f;
    }
}

int main(void)
{
    IotcompressConfig config;
    iotcompress_config_default(&config);
    config.selection = IOTCOMPRESS_SELECT_THRESHOLD;
    config.threshold = 0.9f;
    config.quant = IOTCOMPRESS_QUANT_INT8;
    config.momentum_kind = IOTCOMPRESS_MOMENTUM_VANILLA;
    config.momentum = 0.9f;

    IotcompressSizes sizes;
    if (check(iotcompress_sizes(&config, NUMEL, &sizes), "sizes")) return 1;
    if (sizes.scratch_len > NUMEL || sizes.max_message_len > sizeof message) return 1;
    if (check(iotcompress_init(&compressor, &config, NUMEL), "init")) return 1;

    IotcompressBuffers bufs = { residual, NUMEL, velocity, sizes.velocity_len,
                                scratch, sizes.scratch_len };
    static float grad[NUMEL];
    for (uint32_t step = 0; step < 5; step++) {
        compute_gradient(grad, step);
        IotcompressStepInfo info;
        if (check(iotcompress_compress(&compressor, &bufs, grad, NUMEL, message, sizeof message, &info),
                  "compress"))
            return 1;
        if (send_bytes(message, info.bytes)) return 1;
    }
    return 0;
}
