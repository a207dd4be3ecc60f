/* api_request.c - the producer API's request bodies (see api_request.h). */
#include "api_request.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "event.h"

#define BODY_MAX 8192 /* evhttp refuses larger bodies (413) long before this */

/* The body's JSON object, or NULL with the reason. */
static json_t *body_object(const char *content_type, const char *body, size_t len, char *detail,
                           size_t detail_len) {
    if (content_type == NULL || strncasecmp(content_type, "application/json", 16) != 0 ||
        (content_type[16] != '\0' && content_type[16] != ';')) {
        snprintf(detail, detail_len, "Content-Type must be application/json");
        return NULL;
    }
    if (len == 0 || len > BODY_MAX) {
        snprintf(detail, detail_len, len ? "body too large" : "empty body");
        return NULL;
    }
    if (memchr(body, '\0', len) != NULL) { /* jansson lets some NULs through silently */
        snprintf(detail, detail_len, "body contains a NUL byte");
        return NULL;
    }
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        snprintf(detail, detail_len, "malformed JSON at column %d: %.120s", jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        snprintf(detail, detail_len, "body must be a JSON object");
        return NULL;
    }
    return root;
}

/* Reads integer field name of obj within [min, max]; -1 with the reason. */
static int int_field(json_t *obj, const char *name, int64_t min, int64_t max, int64_t *out,
                     char *detail, size_t detail_len) {
    json_t *v = json_object_get(obj, name);
    if (v == NULL) {
        snprintf(detail, detail_len, "field \"%s\" is missing", name);
        return -1;
    }
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(detail, detail_len, "field \"%s\" must be an integer in %" PRId64 "..%" PRId64,
                 name, min, max);
        return -1;
    }
    *out = json_integer_value(v);
    return 0;
}

/* One integer field of a body: its name, its range, where it goes; an optional one takes dflt
 * when absent. */
typedef struct field {
    const char *name;
    int64_t min, max;
    int64_t *out;
    int optional;
    int64_t dflt;
} field;

#define FIELDS_MAX 5

/* Parses the body and reads every field of f; the outputs are written only when all are good. */
static int parse_fields(const char *content_type, const char *body, size_t len, const field *f,
                        int n, char *detail, size_t detail_len) {
    int64_t v[FIELDS_MAX];
    json_t *root = body_object(content_type, body, len, detail, detail_len);
    if (root == NULL) return -1;
    for (int i = 0; i < n; i++) {
        if (f[i].optional && json_object_get(root, f[i].name) == NULL) {
            v[i] = f[i].dflt;
            continue;
        }
        if (int_field(root, f[i].name, f[i].min, f[i].max, &v[i], detail, detail_len) != 0) {
            json_decref(root);
            return -1;
        }
    }
    json_decref(root);
    for (int i = 0; i < n; i++) *f[i].out = v[i];
    return 0;
}

int sp_order_body_parse(const char *content_type, const char *body, size_t len, sp_order_body *out,
                        char *detail, size_t detail_len) {
    const field f[] = {{"user_id", 1, SP_ID_MAX, &out->user_id, 0, 0},
                       {"sku_id", 1, SP_ID_MAX, &out->sku_id, 0, 0},
                       {"qty", 1, SP_QTY_MAX, &out->qty, 0, 0}};
    return parse_fields(content_type, body, len, f, 3, detail, detail_len);
}

int sp_sale_body_parse(const char *content_type, const char *body, size_t len, sp_sale_body *out,
                       char *detail, size_t detail_len) {
    const field f[] = {{"sku_id", 1, SP_ID_MAX, &out->sku_id, 0, 0},
                       {"stock", 0, SP_STOCK_MAX, &out->stock, 0, 0},
                       {"per_user_limit", 0, SP_PER_USER_MAX, &out->per_user_limit, 0, 0},
                       {"pay_timeout_s", 1, SP_PAY_TIMEOUT_MAX, &out->pay_timeout_s, 0, 0},
                       {"shards", 1, SP_SHARDS_MAX, &out->shards, 1, 1}};
    return parse_fields(content_type, body, len, f, 5, detail, detail_len);
}

int sp_pay_body_parse(const char *content_type, const char *body, size_t len, int64_t *qty,
                      char *detail, size_t detail_len) {
    const field f[] = {{"qty", 1, SP_QTY_MAX, qty, 0, 0}};
    return parse_fields(content_type, body, len, f, 1, detail, detail_len);
}

int sp_restock_body_parse(const char *content_type, const char *body, size_t len, int64_t *add,
                          char *detail, size_t detail_len) {
    const field f[] = {{"add", 1, SP_STOCK_MAX, add, 0, 0}};
    return parse_fields(content_type, body, len, f, 1, detail, detail_len);
}
