/* log.c - JSON log lines on stderr: one object per line with time, level, worker and context. */
#include "log.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 2048 /* a longer message is cut; the line stays valid JSON */

sp_log_level sp_log_min_level = SP_LOG_INFO;

static char log_worker[32] = "stockpipe";
static char log_worker_id[96] = "";

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void sp_log_init(const char *worker, const char *worker_id, sp_log_level min_level) {
    snprintf(log_worker, sizeof(log_worker), "%s", worker ? worker : "stockpipe");
    snprintf(log_worker_id, sizeof(log_worker_id), "%s", worker_id ? worker_id : "");
    sp_log_min_level = min_level;
}

int sp_log_level_parse(const char *name, sp_log_level *level) {
    if (name == NULL) return -1;
    if (strcasecmp(name, "debug") == 0)
        *level = SP_LOG_DEBUG;
    else if (strcasecmp(name, "info") == 0)
        *level = SP_LOG_INFO;
    else if (strcasecmp(name, "warn") == 0 || strcasecmp(name, "warning") == 0)
        *level = SP_LOG_WARN;
    else if (strcasecmp(name, "error") == 0)
        *level = SP_LOG_ERROR;
    else
        return -1;
    return 0;
}

void sp_json_escape_append(char *buf, size_t cap, size_t *pos, const char *s) {
    static const char hex[] = "0123456789abcdef";
    size_t p = *pos;
    if (cap == 0) return;
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[7];
        size_t n;
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c, n = 2;
        } else if (c == '\n') {
            esc[0] = '\\', esc[1] = 'n', n = 2;
        } else if (c == '\t') {
            esc[0] = '\\', esc[1] = 't', n = 2;
        } else if (c < 0x20 || c >= 0x7f) {
            /* Not valid on its own in a JSON string (control) or possibly broken UTF-8: keep the
             * byte visible rather than emit a line a log shipper would reject. */
            memcpy(esc, "\\u00", 4), esc[4] = hex[c >> 4], esc[5] = hex[c & 15], n = 6;
        } else {
            esc[0] = (char)c, n = 1;
        }
        if (p + n >= cap) break;
        memcpy(buf + p, esc, n);
        p += n;
    }
    buf[p < cap ? p : cap - 1] = '\0';
    *pos = p;
}

/* Appends printf output, clamping *pos to the bound. */
static void appendf(char *buf, size_t cap, size_t *pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void appendf(char *buf, size_t cap, size_t *pos, const char *fmt, ...) {
    va_list ap;
    int n;
    if (*pos >= cap - 1) return;
    va_start(ap, fmt);
    n = vsnprintf(buf + *pos, cap - *pos, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    *pos = (*pos + (size_t)n >= cap) ? cap - 1 : *pos + (size_t)n;
}

void sp_log_write(sp_log_level level, const sp_log_ctx *ctx, const char *fmt, ...) {
    char msg[LOG_LINE_MAX];
    char line[LOG_LINE_MAX * 6 + 1024]; /* worst case: every byte escaped as \u00XX */
    size_t pos = 0;
    struct timespec ts;
    struct tm tm;
    va_list ap;

    if ((unsigned)level > SP_LOG_ERROR) level = SP_LOG_ERROR;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    appendf(line, sizeof(line), &pos,
            "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"worker\":\"",
            tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, level_names[level]);
    sp_json_escape_append(line, sizeof(line), &pos, log_worker);
    if (log_worker_id[0]) {
        appendf(line, sizeof(line), &pos, "\",\"worker_id\":\"");
        sp_json_escape_append(line, sizeof(line), &pos, log_worker_id);
    }
    appendf(line, sizeof(line), &pos, "\",\"msg\":\"");
    sp_json_escape_append(line, sizeof(line), &pos, msg);
    appendf(line, sizeof(line), &pos, "\"");
    if (ctx) {
        if (ctx->order_id) {
            appendf(line, sizeof(line), &pos, ",\"order_id\":\"");
            sp_json_escape_append(line, sizeof(line), &pos, ctx->order_id);
            appendf(line, sizeof(line), &pos, "\"");
        }
        if (ctx->sku_id)
            appendf(line, sizeof(line), &pos, ",\"sku_id\":%lld", (long long)ctx->sku_id);
        if (ctx->has_kafka)
            appendf(line, sizeof(line), &pos, ",\"partition\":%d,\"offset\":%lld",
                    (int)ctx->partition, (long long)ctx->offset);
    }
    /* Room for the closing brace and newline is always kept: the escapes stop short of the end. */
    if (pos > sizeof(line) - 3) pos = sizeof(line) - 3;
    line[pos++] = '}';
    line[pos++] = '\n';
    /* One write per line: atomic for lines under PIPE_BUF on a pipe; never retried partially. */
    ssize_t w = write(STDERR_FILENO, line, pos);
    (void)w;
}
