/* log.h - JSON log lines on stderr: one object per line with time, level, worker and context. */
#ifndef SP_LOG_H
#define SP_LOG_H

#include <stddef.h>
#include <stdint.h>

typedef enum sp_log_level {
    SP_LOG_DEBUG = 0,
    SP_LOG_INFO,
    SP_LOG_WARN,
    SP_LOG_ERROR,
} sp_log_level;

/* Optional context carried on a line. Absent fields: order_id NULL, sku_id 0, has_kafka 0. */
typedef struct sp_log_ctx {
    const char *order_id;
    int64_t sku_id;
    int has_kafka; /* partition and offset are meaningful */
    int32_t partition;
    int64_t offset;
} sp_log_ctx;

/* Lines below this level are skipped before any formatting is done. */
extern sp_log_level sp_log_min_level;

/* Names the worker on every line; call once at startup, before any thread starts. worker and
 * worker_id are copied (truncated to a bound). */
void sp_log_init(const char *worker, const char *worker_id, sp_log_level min_level);

/* "debug", "info", "warn"/"warning", "error" (any case) -> *level; -1 for anything else. */
int sp_log_level_parse(const char *name, sp_log_level *level) __attribute__((warn_unused_result));

/* Formats and writes one line with a single write(2), so lines from several threads never
 * interleave. Never fails the caller: an over-long message is truncated. Thread-safe. */
void sp_log_write(sp_log_level level, const sp_log_ctx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define SP_LOG(level, ...)                                                                         \
    do {                                                                                           \
        if ((level) >= sp_log_min_level) sp_log_write((level), NULL, __VA_ARGS__);                 \
    } while (0)

#define SP_LOG_CTX(level, ctx, ...)                                                                \
    do {                                                                                           \
        if ((level) >= sp_log_min_level) sp_log_write((level), (ctx), __VA_ARGS__);                \
    } while (0)

#define sp_debug(...) SP_LOG(SP_LOG_DEBUG, __VA_ARGS__)
#define sp_info(...)  SP_LOG(SP_LOG_INFO, __VA_ARGS__)
#define sp_warn(...)  SP_LOG(SP_LOG_WARN, __VA_ARGS__)
#define sp_error(...) SP_LOG(SP_LOG_ERROR, __VA_ARGS__)

/* Appends s to buf[*pos..cap) as JSON string contents (no quotes), escaping what JSON requires and
 * replacing bytes that are not printable ASCII by \u00XX, so any input gives valid JSON. Stops
 * at the bound; *pos never passes cap - 1. Shared with the HTTP replies. */
void sp_json_escape_append(char *buf, size_t cap, size_t *pos, const char *s);

#endif
