/* fuzz_api_request.c - libFuzzer target: the producer API's request-body parsers (api_request.h).
 *
 * Input layout: one selector byte, then the body.
 *   bits 0-1  which parser: 0 order, 1 sale, 2 restock, 3 all of them (and the payment's) on the
 *             same body
 *   bits 2-4  the Content-Type: one of seven fixed values, or 7 = taken from the input (the bytes
 *             up to the first '\n', which then ends it; the body is what follows)
 *   bit 5     a small detail buffer (24 bytes) instead of SP_API_DETAIL_MAX
 * The body is copied into a buffer of exactly its length (no NUL after it), so AddressSanitizer
 * sees any read past its end.
 *
 * Invariants checked (abort() on a violation, which libFuzzer reports as a crash):
 *   - success: every field lies within the range api_request.h / event.h document, the body was
 *     1..8192 bytes without a NUL, and the Content-Type was application/json[;...];
 *   - failure: detail is non-empty (when it has room for a character) and NUL-terminated within
 *     its buffer, and the output was left untouched.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api_request.h"
#include "event.h"

#define CT_MAX    256 /* longest Content-Type taken from the input */
#define SMALL_DET 24

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond, what)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_api_request: invariant broken: %s (%s:%d)\n", what, __FILE__,    \
                    __LINE__);                                                                     \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static const char *const content_types[7] = {
    "application/json", "application/json; charset=utf-8", "Application/JSON",  NULL,
    "text/plain",       "application/json-patch+json",     "application/jsonx",
};

/* The byte pattern outputs are filled with before a call: a failure must leave it. */
#define POISON 0xA5

static int poisoned(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != POISON) return 0;
    return 1;
}

static int json_content_type(const char *ct) {
    return ct != NULL && strncasecmp(ct, "application/json", 16) == 0 &&
           (ct[16] == '\0' || ct[16] == ';');
}

/* What every successful parse implies about its input. */
static void check_accepted_input(const char *ct, const char *body, size_t len) {
    CHECK(json_content_type(ct), "accepted a Content-Type other than application/json");
    CHECK(len >= 1 && len <= 8192, "accepted an empty or oversized body");
    CHECK(memchr(body, '\0', len) == NULL, "accepted a body with a NUL byte");
}

static void check_detail(const char *detail, size_t detail_len) {
    const char *nul = memchr(detail, '\0', detail_len);
    CHECK(nul != NULL, "detail is not NUL-terminated within its buffer");
    if (detail_len > 1) CHECK(detail[0] != '\0', "failure with an empty detail");
}

static void run_order(const char *ct, const char *body, size_t len, char *detail, size_t dlen) {
    sp_order_body b;
    memset(&b, POISON, sizeof(b));
    memset(detail, POISON, dlen);
    if (sp_order_body_parse(ct, body, len, &b, detail, dlen) == 0) {
        check_accepted_input(ct, body, len);
        CHECK(b.user_id >= 1 && b.user_id <= SP_ID_MAX, "user_id out of range");
        CHECK(b.sku_id >= 1 && b.sku_id <= SP_ID_MAX, "sku_id out of range");
        CHECK(b.qty >= 1 && b.qty <= SP_QTY_MAX, "qty out of range");
    } else {
        check_detail(detail, dlen);
        CHECK(poisoned(&b, sizeof(b)), "a failed order parse wrote its output");
    }
}

static void run_sale(const char *ct, const char *body, size_t len, char *detail, size_t dlen) {
    sp_sale_body b;
    memset(&b, POISON, sizeof(b));
    memset(detail, POISON, dlen);
    if (sp_sale_body_parse(ct, body, len, &b, detail, dlen) == 0) {
        check_accepted_input(ct, body, len);
        CHECK(b.sku_id >= 1 && b.sku_id <= SP_ID_MAX, "sku_id out of range");
        CHECK(b.stock >= 0 && b.stock <= SP_STOCK_MAX, "stock out of range");
        CHECK(b.per_user_limit >= 0 && b.per_user_limit <= SP_PER_USER_MAX,
              "per_user_limit out of range");
        CHECK(b.pay_timeout_s >= 1 && b.pay_timeout_s <= SP_PAY_TIMEOUT_MAX,
              "pay_timeout_s out of range");
    } else {
        check_detail(detail, dlen);
        CHECK(poisoned(&b, sizeof(b)), "a failed sale parse wrote its output");
    }
}

static void run_restock(const char *ct, const char *body, size_t len, char *detail, size_t dlen) {
    int64_t add;
    memset(&add, POISON, sizeof(add));
    memset(detail, POISON, dlen);
    if (sp_restock_body_parse(ct, body, len, &add, detail, dlen) == 0) {
        check_accepted_input(ct, body, len);
        CHECK(add >= 1 && add <= SP_STOCK_MAX, "add out of range");
    } else {
        check_detail(detail, dlen);
        CHECK(poisoned(&add, sizeof(add)), "a failed restock parse wrote its output");
    }
}

static void run_pay(const char *ct, const char *body, size_t len, char *detail, size_t dlen) {
    int64_t qty;
    memset(&qty, POISON, sizeof(qty));
    memset(detail, POISON, dlen);
    if (sp_pay_body_parse(ct, body, len, &qty, detail, dlen) == 0) {
        check_accepted_input(ct, body, len);
        CHECK(qty >= 1 && qty <= SP_QTY_MAX, "qty out of range");
    } else {
        check_detail(detail, dlen);
        CHECK(poisoned(&qty, sizeof(qty)), "a failed payment parse wrote its output");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char ct_buf[CT_MAX + 1];
    const char *ct;
    if (size == 0) return 0;
    unsigned sel = data[0];
    const uint8_t *rest = data + 1;
    size_t nrest = size - 1;
    unsigned ct_idx = (sel >> 2) & 7;
    if (ct_idx < 7) {
        ct = content_types[ct_idx];
    } else { /* the Content-Type is the input's first line */
        const uint8_t *nl = memchr(rest, '\n', nrest < CT_MAX ? nrest : CT_MAX);
        size_t n = nl ? (size_t)(nl - rest) : (nrest < CT_MAX ? nrest : CT_MAX);
        memcpy(ct_buf, rest, n);
        ct_buf[n] = '\0'; /* a NUL inside ends the header early, as a C string would */
        ct = ct_buf;
        rest += n + (nl != NULL);
        nrest -= n + (nl != NULL);
    }
    size_t dlen = (sel & 0x20) ? SMALL_DET : SP_API_DETAIL_MAX;

    /* Exactly sized heap copies: ASan flags a read past the body or a write past the detail. */
    char *body = malloc(nrest ? nrest : 1);
    char *detail = malloc(dlen);
    if (body == NULL || detail == NULL) abort();
    if (nrest) memcpy(body, rest, nrest);

    switch (sel & 3) {
    case 0:
        run_order(ct, body, nrest, detail, dlen);
        break;
    case 1:
        run_sale(ct, body, nrest, detail, dlen);
        break;
    case 2:
        run_restock(ct, body, nrest, detail, dlen);
        break;
    default:
        run_order(ct, body, nrest, detail, dlen);
        run_sale(ct, body, nrest, detail, dlen);
        run_restock(ct, body, nrest, detail, dlen);
        run_pay(ct, body, nrest, detail, dlen);
        break;
    }
    free(detail);
    free(body);
    return 0;
}
