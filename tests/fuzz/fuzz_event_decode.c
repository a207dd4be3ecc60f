/* fuzz_event_decode.c - libFuzzer target: the event codec's decoder (event.h), and its encoder on
 * whatever the decoder accepts.
 *
 * The input is one Kafka message value, copied into a buffer of exactly its length (no NUL after
 * it), so AddressSanitizer sees any read past its end.
 *
 * Invariants checked (abort() on a violation, which libFuzzer reports as a crash):
 *   - failure: the reason is non-empty, NUL-terminated and printable ASCII (it is logged and put in
 *     dead-letter headers), and the event is all zero;
 *   - success: the input held no NUL byte and at most 4 * SP_EVENT_MAX bytes; the event is
 *     within the bounds encode enforces, so it encodes; the encoding is at
 *     most SP_EVENT_MAX bytes and decodes to the same event; encoding that again gives the same
 *     bytes (the round trip is stable, as replay needs).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "event.h"

#define ERR_LEN 256

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond, what)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_event_decode: invariant broken: %s (%s:%d)\n", what, __FILE__,   \
                    __LINE__);                                                                     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static int all_zero(const sp_event *ev) {
    static const sp_event zero;
    return ev->type == zero.type && ev->ts_ms == 0 && ev->sku_id == 0 && ev->order_id[0] == '\0' &&
           ev->user_id == 0 && ev->qty == 0 && ev->expires_ms == 0 && ev->stock == 0 &&
           ev->per_user_limit == 0 && ev->pay_timeout_s == 0 && ev->reason[0] == '\0';
}

static int same_event(const sp_event *a, const sp_event *b) {
    return a->type == b->type && a->ts_ms == b->ts_ms && a->sku_id == b->sku_id &&
           strcmp(a->order_id, b->order_id) == 0 && a->user_id == b->user_id && a->qty == b->qty &&
           a->expires_ms == b->expires_ms && a->stock == b->stock &&
           a->per_user_limit == b->per_user_limit && a->pay_timeout_s == b->pay_timeout_s &&
           strcmp(a->reason, b->reason) == 0;
}

static void check_reason(const char *err) {
    const char *nul = memchr(err, '\0', ERR_LEN);
    CHECK(nul != NULL, "the reason is not NUL-terminated within its buffer");
    CHECK(err[0] != '\0', "failure with an empty reason");
    for (const char *p = err; p < nul; p++)
        CHECK(*p >= 0x20 && *p <= 0x7e, "the reason holds a byte outside printable ASCII");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sp_event ev, again;
    char err[ERR_LEN], buf[SP_EVENT_MAX + 1], buf2[SP_EVENT_MAX + 1];
    size_t len = 0, len2 = 0;
    char *copy = calloc(1, size ? size : 1);
    if (copy == NULL) abort();
    if (size) memcpy(copy, data, size);

    memset(&ev, 0x5A, sizeof(ev));
    memset(err, 0x5A, sizeof(err));
    if (sp_event_decode(copy, size, &ev, err, sizeof(err)) != 0) {
        check_reason(err);
        CHECK(all_zero(&ev), "a failed decode left a partly filled event");
        free(copy);
        return 0;
    }
    free(copy);

    /* jansson 2.14 skips a NUL right after a number (akheron/jansson#331); the decoder refuses
     * any NUL so that two byte strings never decode to one event (regressions/). */
    CHECK(memchr(data, '\0', size) == NULL, "accepted an input with a NUL byte");
    CHECK(size <= 4 * SP_EVENT_MAX, "accepted an input over the decoder's size bound");
    CHECK(sp_event_type_name(ev.type) != NULL, "decoded an event of no known type");
    CHECK(ev.sku_id >= 1 && ev.sku_id <= SP_ID_MAX, "sku_id out of range");
    CHECK(ev.ts_ms >= 0 && ev.ts_ms <= SP_TS_MAX, "ts_ms out of range");
    if (sp_event_encode(&ev, buf, sizeof(buf), &len, err, sizeof(err)) != 0) {
        fprintf(stderr, "encode refused a decoded event: %s\n", err);
        CHECK(0, "a decoded event does not encode");
    }
    CHECK(len == strlen(buf) && len <= SP_EVENT_MAX, "the encoding's length is wrong");
    memset(&again, 0x5A, sizeof(again));
    if (sp_event_decode(buf, len, &again, err, sizeof(err)) != 0) {
        fprintf(stderr, "decode refused an encoded event: %s\n%s\n", err, buf);
        CHECK(0, "an encoded event does not decode");
    }
    CHECK(same_event(&ev, &again), "decode(encode(ev)) differs from ev");
    CHECK(sp_event_encode(&again, buf2, sizeof(buf2), &len2, err, sizeof(err)) == 0,
          "the second encode failed");
    CHECK(len2 == len && memcmp(buf, buf2, len) == 0, "encoding is not stable across a round trip");
    return 0;
}
