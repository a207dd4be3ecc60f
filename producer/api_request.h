/* api_request.h - the producer API's request bodies: JSON in, checked fields out.
 *
 * Pure functions (no I/O, no HTTP library): the API calls them with the body evhttp read, the
 * fuzz targets with arbitrary bytes. Each either fills its output and returns 0, or returns -1
 * with a one-sentence reason in detail (what the 400 answer's "detail" says) and leaves the
 * output untouched.
 */
#ifndef SP_API_REQUEST_H
#define SP_API_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#define SP_API_DETAIL_MAX 200 /* room for any detail these functions write */

/* POST /v1/orders {"user_id":…, "sku_id":…, "qty":…} */
typedef struct sp_order_body {
    int64_t user_id, sku_id, qty;
} sp_order_body;

/* POST /v1/skus {"sku_id":…, "stock":…, "per_user_limit":…, "pay_timeout_s":…, "shards":…}
 * (shards optional: 1 when absent) */
typedef struct sp_sale_body {
    int64_t sku_id, stock, per_user_limit, pay_timeout_s, shards;
} sp_sale_body;

/* content_type is the request's Content-Type header (NULL when absent): it must be
 * application/json, optionally followed by parameters. body need not be NUL-terminated. */
int sp_order_body_parse(const char *content_type, const char *body, size_t len, sp_order_body *out,
                        char *detail, size_t detail_len);
int sp_sale_body_parse(const char *content_type, const char *body, size_t len, sp_sale_body *out,
                       char *detail, size_t detail_len);
/* POST /v1/orders/{id}/pay {"qty":…}: the units paid for, which must be the order's */
int sp_pay_body_parse(const char *content_type, const char *body, size_t len, int64_t *qty,
                      char *detail, size_t detail_len);
/* POST /v1/skus/{id}/restock {"add":…} */
int sp_restock_body_parse(const char *content_type, const char *body, size_t len, int64_t *add,
                          char *detail, size_t detail_len);

#endif
