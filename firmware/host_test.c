/* Host checks of the C header and library (tests/test_mcu.py builds this with gcc and g++
   against the host staticlib): it compiles as strict C99 and C++, the static size macros
   bound the library's sizes, an all-zero config is the default, every code has a name. */
#include <stdio.h>
#include <string.h>

#include "iotcompress.h"

/* The macros are integer constant expressions: static buffers can use them. */
static uint8_t static_msg[IOTCOMPRESS_MAX_MESSAGE_LEN(100u, IOTCOMPRESS_VALUE_BITS_INT8)];
static uint8_t static_state[IOTCOMPRESS_STREAM_STATE_LEN(100u, IOTCOMPRESS_STATE_INT8, 1)];

static int failures;
#define CHECK(cond)                                                  \
    do {                                                             \
        if (!(cond)) {                                               \
            printf("FAIL line %d: %s\n", __LINE__, #cond);           \
            failures++;                                              \
        }                                                            \
    } while (0)

int main(void)
{
    static const struct { IotcompressQuant quant; uint32_t levels; uint32_t bits; } quants[] = {
        { IOTCOMPRESS_QUANT_F32, 0, IOTCOMPRESS_VALUE_BITS_F32 },
        { IOTCOMPRESS_QUANT_F16, 0, IOTCOMPRESS_VALUE_BITS_F16 },
        { IOTCOMPRESS_QUANT_BF16, 0, IOTCOMPRESS_VALUE_BITS_BF16 },
        { IOTCOMPRESS_QUANT_INT8, 0, IOTCOMPRESS_VALUE_BITS_INT8 },
        { IOTCOMPRESS_QUANT_INT4, 0, IOTCOMPRESS_VALUE_BITS_INT4 },
        { IOTCOMPRESS_QUANT_SIGN, 0, IOTCOMPRESS_VALUE_BITS_SIGN },
        { IOTCOMPRESS_QUANT_TERNARY, 0, IOTCOMPRESS_VALUE_BITS_TERNARY },
        { IOTCOMPRESS_QUANT_QSGD, 1, IOTCOMPRESS_VALUE_BITS_QSGD },
        { IOTCOMPRESS_QUANT_QSGD, 255, IOTCOMPRESS_VALUE_BITS_QSGD },
    };
    static const uint32_t numels[] = { 0u, 1u, 5u, 8u, 100u, 4097u, 1000000u };
    for (size_t q = 0; q < sizeof quants / sizeof quants[0]; q++)
        for (size_t n = 0; n < sizeof numels / sizeof numels[0]; n++) {
            size_t len = iotcompress_max_message_len(quants[q].quant, quants[q].levels, numels[n]);
            CHECK(len > 0 && len <= IOTCOMPRESS_MAX_MESSAGE_LEN(numels[n], quants[q].bits));
        }
    CHECK(sizeof static_msg >= iotcompress_max_message_len(IOTCOMPRESS_QUANT_INT8, 0, 100));

    IotcompressConfig config, zero;
    memset(&zero, 0, sizeof zero);
    CHECK(iotcompress_config_default(&config) == IOTCOMPRESS_OK);
    CHECK(memcmp(&config, &zero, sizeof config) == 0);
    CHECK(iotcompress_state_size() == sizeof(IotcompressCompressor));

    IotcompressSizes sizes;
    config.selection = IOTCOMPRESS_SELECT_TOPK;
    config.density = 0.01;
    CHECK(iotcompress_sizes(&config, 100000u, &sizes) == IOTCOMPRESS_OK);
    CHECK(sizes.scratch_len <= IOTCOMPRESS_MAX_SCRATCH_LEN(100000u));
    CHECK(sizes.state_size == sizeof(IotcompressCompressor));
    config.quant = 99;
    CHECK(iotcompress_sizes(&config, 10u, &sizes) == IOTCOMPRESS_ERR_INVALID_CONFIG);
    CHECK(iotcompress_sizes(NULL, 10u, &sizes) == IOTCOMPRESS_ERR_NULL_POINTER);

    static const int codes[] = { IOTCOMPRESS_OK, IOTCOMPRESS_ERR_TRUNCATED, IOTCOMPRESS_ERR_CHECKSUM_MISMATCH,
                                 IOTCOMPRESS_ERR_INVALID_CONFIG, IOTCOMPRESS_ERR_NULL_POINTER,
                                 IOTCOMPRESS_ERR_BAD_STATE, IOTCOMPRESS_ERR_UNKNOWN };
    static const char *const names[] = { "IOTCOMPRESS_OK", "IOTCOMPRESS_ERR_TRUNCATED",
                                         "IOTCOMPRESS_ERR_CHECKSUM_MISMATCH", "IOTCOMPRESS_ERR_INVALID_CONFIG",
                                         "IOTCOMPRESS_ERR_NULL_POINTER", "IOTCOMPRESS_ERR_BAD_STATE",
                                         "IOTCOMPRESS_ERR_UNKNOWN" };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        CHECK(strcmp(iotcompress_error_name(codes[i]), names[i]) == 0);
        CHECK(iotcompress_error_message(codes[i])[0] != 0);
    }
    CHECK(strcmp(iotcompress_error_name(12345), "IOTCOMPRESS_ERR_UNKNOWN") == 0);

    /* An uninitialised (zeroed) state is an error code, not a crash. */
    IotcompressCompressor state;
    memset(&state, 0, sizeof state);
    float r[4] = { 0 }, g[4] = { 1, 2, 3, 4 };
    uint32_t s[4];
    uint8_t out[64];
    IotcompressBuffers bufs = { r, 4, NULL, 0, s, 4 };
    CHECK(iotcompress_compress(&state, &bufs, g, 4, out, sizeof out, NULL) == IOTCOMPRESS_ERR_BAD_STATE);

    /* The streaming API: the state-size macro equals the library's size for every format,
       an all-zero streaming config is the default, a zeroed stream struct is an error. */
    IotcompressStreamConfig sc, szero;
    memset(&szero, 0, sizeof szero);
    CHECK(iotcompress_stream_config_default(&sc) == IOTCOMPRESS_OK);
    CHECK(memcmp(&sc, &szero, sizeof sc) == 0);
    CHECK(iotcompress_stream_size() == sizeof(IotcompressStream));
    static const IotcompressStateFormat formats[] = { IOTCOMPRESS_STATE_F32, IOTCOMPRESS_STATE_F16,
                                                      IOTCOMPRESS_STATE_BF16, IOTCOMPRESS_STATE_INT8 };
    for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++)
        for (size_t n = 0; n < sizeof numels / sizeof numels[0]; n++)
            for (uint32_t m = 0; m < 2u; m++) {
                IotcompressStreamSizes ss;
                sc.numel = numels[n];
                sc.threshold = 0.5f;
                sc.quant = IOTCOMPRESS_QUANT_INT8;
                sc.state_format = formats[f];
                sc.momentum_kind = m ? IOTCOMPRESS_MOMENTUM_VANILLA : IOTCOMPRESS_MOMENTUM_NONE;
                sc.momentum = m ? 0.9f : 0.0f;
                CHECK(iotcompress_stream_sizes(&sc, &ss) == IOTCOMPRESS_OK);
                CHECK(ss.state_len == IOTCOMPRESS_STREAM_STATE_LEN(numels[n], formats[f], m));
                CHECK(ss.full_message_len == IOTCOMPRESS_MAX_MESSAGE_LEN(numels[n], IOTCOMPRESS_VALUE_BITS_INT8));
                CHECK(ss.stream_size == sizeof(IotcompressStream));
            }
    CHECK(sizeof static_state == 2u * (100u + 4u * 4u));
    IotcompressStream zstream;
    memset(&zstream, 0, sizeof zstream);
    IotcompressStreamBuffers sbufs = { static_state, sizeof static_state, out, sizeof out };
    CHECK(iotcompress_stream_begin(&zstream, &sbufs) == IOTCOMPRESS_ERR_BAD_STATE);
    CHECK(strcmp(iotcompress_error_name(IOTCOMPRESS_ERR_INCOMPLETE), "IOTCOMPRESS_ERR_INCOMPLETE") == 0);

    printf("host_test: %d failures\n", failures);
    return failures != 0;
}
