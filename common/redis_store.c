/* redis_store.c - Redis connections (single server or via Sentinel) and Lua scripts by EVALSHA. */
#include "redis_store.h"

#include <hiredis/adapters/libevent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

#define EVALSHA_ARGS_MAX SP_REDIS_SCRIPT_ARGV_MAX /* the same bound as the async calls */

/* Parses "host[:port]" of length n. */
static int parse_hostport(const char *s, size_t n, sp_redis_target *t, int defport, char *errbuf,
                          size_t errlen) {
    if (t->nhosts >= SP_REDIS_HOSTS_MAX) {
        snprintf(errbuf, errlen, "REDIS_URL names more than %d hosts", SP_REDIS_HOSTS_MAX);
        return -1;
    }
    const char *colon = memchr(s, ':', n);
    size_t hlen = colon ? (size_t)(colon - s) : n;
    if (hlen == 0 || hlen >= sizeof(t->hosts[0].host)) {
        snprintf(errbuf, errlen, "REDIS_URL has an empty or over-long host name");
        return -1;
    }
    int port = defport;
    if (colon) {
        char num[8];
        size_t plen = n - hlen - 1;
        char *end;
        if (plen == 0 || plen >= sizeof(num)) goto badport;
        memcpy(num, colon + 1, plen);
        num[plen] = '\0';
        long v = strtol(num, &end, 10);
        if (*end != '\0' || v < 1 || v > 65535) goto badport;
        port = (int)v;
    }
    memcpy(t->hosts[t->nhosts].host, s, hlen);
    t->hosts[t->nhosts].host[hlen] = '\0';
    t->hosts[t->nhosts].port = port;
    t->nhosts++;
    return 0;
badport:
    snprintf(errbuf, errlen, "REDIS_URL has a bad port in \"%.*s\"; use 1..65535", (int)n, s);
    return -1;
}

int sp_redis_parse_url(const char *url, sp_redis_target *t, char *errbuf, size_t errlen) {
    sp_redis_target out;
    const char *p;
    memset(&out, 0, sizeof(out));
    if (strncmp(url, "redis://", 8) == 0) {
        p = url + 8;
    } else if (strncmp(url, "sentinel://", 11) == 0) {
        p = url + 11;
        out.sentinel = 1;
    } else if (strncmp(url, "redis-cluster://", 16) == 0) {
        p = url + 16;
        out.cluster = 1;
    } else {
        char shown[128];
        sp_config_redact(url, shown, sizeof(shown)); /* a password never reaches a message */
        snprintf(errbuf, errlen,
                 "REDIS_URL must start with redis://, sentinel:// or redis-cluster:// (got "
                 "\"%.40s\")",
                 shown);
        return -1;
    }
    const char *at = strchr(p, '@'), *slash;
    if (at) { /* [user]:password@ */
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL || (size_t)(at - colon - 1) >= sizeof(out.password)) {
            snprintf(errbuf, errlen, "REDIS_URL credentials must be :password@ (bounded)");
            return -1;
        }
        memcpy(out.password, colon + 1, (size_t)(at - colon - 1));
        p = at + 1;
    }
    slash = strchr(p, '/');
    size_t hostslen = slash ? (size_t)(slash - p) : strlen(p);
    for (const char *h = p; h < p + hostslen;) {
        const char *comma = memchr(h, ',', (size_t)(p + hostslen - h));
        size_t n = comma ? (size_t)(comma - h) : (size_t)(p + hostslen - h);
        if (parse_hostport(h, n, &out, out.sentinel ? 26379 : 6379, errbuf, errlen) != 0) return -1;
        h += n + (comma ? 1 : 0);
    }
    if (out.nhosts == 0) {
        snprintf(errbuf, errlen, "REDIS_URL names no host");
        return -1;
    }
    if (!out.sentinel && !out.cluster && out.nhosts != 1) {
        snprintf(errbuf, errlen,
                 "REDIS_URL redis:// takes one host; use sentinel:// or redis-cluster:// for "
                 "several");
        return -1;
    }
    const char *rest = slash ? slash + 1 : "";
    if (out.sentinel) {
        const char *s2 = strchr(rest, '/');
        size_t mlen = s2 ? (size_t)(s2 - rest) : strlen(rest);
        if (mlen == 0 || mlen >= sizeof(out.master)) {
            snprintf(errbuf, errlen, "REDIS_URL sentinel:// needs /master_name after the hosts");
            return -1;
        }
        memcpy(out.master, rest, mlen);
        rest = s2 ? s2 + 1 : "";
    }
    if (*rest) {
        char *end;
        long db = strtol(rest, &end, 10);
        if (*end != '\0' || db < 0 || db > 15) {
            snprintf(errbuf, errlen, "REDIS_URL database must be 0..15 (got \"%.20s\")", rest);
            return -1;
        }
        out.db = (int)db;
    }
    if (out.cluster && out.db != 0) {
        snprintf(errbuf, errlen, "REDIS_URL redis-cluster:// has only database 0");
        return -1;
    }
    *t = out;
    return 0;
}

/* Runs one command and checks for a status reply (OK); -1 with errbuf otherwise. */
static int command_ok(redisContext *c, char *errbuf, size_t errlen, const char *what,
                      const char *fmt, const char *arg) {
    redisReply *r = redisCommand(c, fmt, arg);
    int rc = 0;
    if (r == NULL) {
        snprintf(errbuf, errlen, "%s: %s", what, c->errstr);
        return -1;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(errbuf, errlen, "%s: %s", what, r->str);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

static redisContext *connect_one(const char *host, int port, int timeout_ms, char *errbuf,
                                 size_t errlen) {
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(host, port, tv);
    if (c == NULL) {
        snprintf(errbuf, errlen, "redis %s:%d: out of memory", host, port);
        return NULL;
    }
    if (c->err) {
        snprintf(errbuf, errlen, "redis %s:%d: %s", host, port, c->errstr);
        redisFree(c);
        return NULL;
    }
    if (redisSetTimeout(c, tv) != REDIS_OK) {
        snprintf(errbuf, errlen, "redis %s:%d: cannot set the command timeout", host, port);
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Asks one Sentinel for the primary's address. */
static int sentinel_lookup(const sp_redis_target *t, int i, int timeout_ms, char *host,
                           size_t hostlen, int *port, char *errbuf, size_t errlen) {
    redisContext *s = connect_one(t->hosts[i].host, t->hosts[i].port, timeout_ms, errbuf, errlen);
    redisReply *r = NULL;
    int rc = -1;
    if (s == NULL) return -1;
    r = redisCommand(s, "SENTINEL get-master-addr-by-name %s", t->master);
    if (r == NULL) {
        snprintf(errbuf, errlen, "sentinel %s:%d: %s", t->hosts[i].host, t->hosts[i].port,
                 s->errstr);
        goto out;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING) {
        snprintf(errbuf, errlen, "sentinel %s:%d does not know a primary named \"%s\"",
                 t->hosts[i].host, t->hosts[i].port, t->master);
        goto out;
    }
    snprintf(host, hostlen, "%s", r->element[0]->str);
    *port = atoi(r->element[1]->str);
    rc = 0;
out:
    if (r) freeReplyObject(r);
    redisFree(s);
    return rc;
}

/* True when the server says it is a primary (a Sentinel may answer with a stale address during a
 * failover; writing to a demoted replica would only give READONLY errors). */
static int is_primary(redisContext *c) {
    redisReply *r = redisCommand(c, "ROLE");
    int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
             r->element[0]->type == REDIS_REPLY_STRING && strcmp(r->element[0]->str, "master") == 0;
    if (r) freeReplyObject(r);
    return ok;
}

redisContext *sp_redis_connect(const sp_redis_target *t, int timeout_ms, char *errbuf,
                               size_t errlen) {
    char host[256];
    int port = 0;
    if (t->cluster) { /* one connection cannot reach every slot */
        snprintf(errbuf, errlen, "REDIS_URL redis-cluster:// needs a cluster connection");
        return NULL;
    }
    for (int i = 0; i < t->nhosts; i++) {
        redisContext *c = NULL;
        char dbtext[8];
        if (t->sentinel) {
            if (sentinel_lookup(t, i, timeout_ms, host, sizeof(host), &port, errbuf, errlen) != 0)
                continue;
        } else {
            snprintf(host, sizeof(host), "%s", t->hosts[i].host);
            port = t->hosts[i].port;
        }
        c = connect_one(host, port, timeout_ms, errbuf, errlen);
        if (c == NULL) continue;
        if (t->password[0] && command_ok(c, errbuf, errlen, "AUTH", "AUTH %s", t->password) != 0)
            goto next;
        snprintf(dbtext, sizeof(dbtext), "%d", t->db);
        if (t->db && command_ok(c, errbuf, errlen, "SELECT", "SELECT %s", dbtext) != 0) goto next;
        if (t->sentinel && !is_primary(c)) {
            snprintf(errbuf, errlen, "redis %s:%d is not (yet) the primary", host, port);
            goto next;
        }
        return c;
    next:
        redisFree(c);
    }
    return NULL;
}

redisAsyncContext *sp_redis_async_connect(const sp_redis_target *t, struct event_base *base,
                                          int timeout_ms, redisDisconnectCallback *on_disconnect,
                                          void *data, char *errbuf, size_t errlen) {
    char host[256];
    int port;
    /* Find (and check) the primary with a short blocking connection: with Sentinel the address
     * changes on failover, and a stale one would only answer READONLY. */
    redisContext *probe = sp_redis_connect(t, timeout_ms, errbuf, errlen);
    if (probe == NULL) return NULL;
    snprintf(host, sizeof(host), "%s", probe->tcp.host);
    port = probe->tcp.port;
    redisFree(probe);

    redisAsyncContext *ac = redisAsyncConnect(host, port);
    if (ac == NULL || ac->err) {
        snprintf(errbuf, errlen, "redis %s:%d: %s", host, port, ac ? ac->errstr : "out of memory");
        if (ac) redisAsyncFree(ac);
        return NULL;
    }
    ac->data = data;
    if (redisLibeventAttach(ac, base) != REDIS_OK) {
        snprintf(errbuf, errlen, "redis %s:%d: cannot attach to the event loop", host, port);
        redisAsyncFree(ac);
        return NULL;
    }
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    if (t->password[0]) redisAsyncCommand(ac, NULL, NULL, "AUTH %s", t->password);
    if (t->db) redisAsyncCommand(ac, NULL, NULL, "SELECT %d", t->db);
    return ac;
}

int sp_redis_ping(redisContext *c, char *errbuf, size_t errlen) {
    redisReply *r = redisCommand(c, "PING");
    int rc = -1;
    if (r == NULL) {
        snprintf(errbuf, errlen, "PING: %s", c->errstr);
        return -1;
    }
    if (r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0)
        rc = 0;
    else
        snprintf(errbuf, errlen, "PING: unexpected reply %s",
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    freeReplyObject(r);
    return rc;
}

int sp_redis_script_load(redisContext *c, sp_redis_script *s, char *errbuf, size_t errlen) {
    redisReply *r = redisCommand(c, "SCRIPT LOAD %s", s->body);
    int rc = -1;
    if (r == NULL) {
        snprintf(errbuf, errlen, "SCRIPT LOAD %s: %s", s->name, c->errstr);
        return -1;
    }
    if (r->type == REDIS_REPLY_STRING && r->len == 40) {
        memcpy(s->sha, r->str, 40);
        s->sha[40] = '\0';
        rc = 0;
    } else {
        snprintf(errbuf, errlen, "SCRIPT LOAD %s: %s", s->name,
                 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    }
    freeReplyObject(r);
    return rc;
}

redisReply *sp_redis_evalsha(redisContext *c, sp_redis_script *s, int nkeys, int argc,
                             const char **argv, const size_t *argvlen, char *errbuf,
                             size_t errlen) {
    const char *av[EVALSHA_ARGS_MAX + 3];
    size_t avlen[EVALSHA_ARGS_MAX + 3];
    char nkeystext[12];
    if (argc < 0 || argc > EVALSHA_ARGS_MAX || nkeys < 0 || nkeys > argc) {
        snprintf(errbuf, errlen, "EVALSHA %s: bad argument count", s->name);
        return NULL;
    }
    if (s->sha[0] == '\0' && sp_redis_script_load(c, s, errbuf, errlen) != 0) return NULL;
    snprintf(nkeystext, sizeof(nkeystext), "%d", nkeys);
    av[0] = "EVALSHA", avlen[0] = 7;
    av[1] = s->sha, avlen[1] = 40;
    av[2] = nkeystext, avlen[2] = strlen(nkeystext);
    for (int i = 0; i < argc; i++) av[3 + i] = argv[i], avlen[3 + i] = argvlen[i];
    for (int attempt = 0; attempt < 2; attempt++) {
        redisReply *r = redisCommandArgv(c, argc + 3, av, avlen);
        if (r == NULL) {
            snprintf(errbuf, errlen, "EVALSHA %s: %s", s->name, c->errstr);
            return NULL;
        }
        if (attempt == 0 && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
            freeReplyObject(r);
            if (sp_redis_script_load(c, s, errbuf, errlen) != 0) return NULL;
            continue;
        }
        return r;
    }
    snprintf(errbuf, errlen, "EVALSHA %s: script vanished twice", s->name);
    return NULL;
}

void sp_script_call_init(sp_script_call *call, sp_redis_script *s, int nkeys) {
    call->script = s;
    call->nkeys = nkeys;
    call->argc = 0;
    call->used = 0;
    call->overflow = 0;
}

void sp_script_call_arg(sp_script_call *call, const char *fmt, ...) {
    va_list ap;
    size_t room = sizeof(call->store) - call->used;
    if (call->argc >= SP_SCRIPT_ARGS_MAX || room == 0) {
        call->overflow = 1;
        return;
    }
    va_start(ap, fmt);
    int n = vsnprintf(call->store + call->used, room, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= room) {
        call->overflow = 1;
        return;
    }
    call->argv[call->argc] = call->store + call->used;
    call->argvlen[call->argc] = (size_t)n;
    call->argc++;
    call->used += (size_t)n + 1;
}

redisReply *sp_redis_call(redisContext *c, sp_script_call *call, char *errbuf, size_t errlen) {
    if (call->overflow) {
        snprintf(errbuf, errlen, "script %s: arguments over the bound", call->script->name);
        return NULL;
    }
    return sp_redis_evalsha(c, call->script, call->nkeys, call->argc, call->argv, call->argvlen,
                            errbuf, errlen);
}

int sp_redis_async_script(redisAsyncContext *ac, sp_redis_script *s, int by_body, int nkeys,
                          int argc, const char *const *argv, const size_t *argvlen,
                          redisCallbackFn *fn, void *data) {
    const char *av[SP_REDIS_SCRIPT_ARGV_MAX + 3];
    size_t avlen[SP_REDIS_SCRIPT_ARGV_MAX + 3];
    char nk[12];
    if (argc > SP_REDIS_SCRIPT_ARGV_MAX) return -1;
    snprintf(nk, sizeof(nk), "%d", nkeys);
    if (by_body || s->sha[0] == '\0') {
        av[0] = "EVAL", avlen[0] = 4;
        av[1] = s->body, avlen[1] = strlen(s->body);
    } else {
        av[0] = "EVALSHA", avlen[0] = 7;
        av[1] = s->sha, avlen[1] = 40;
    }
    av[2] = nk, avlen[2] = strlen(nk);
    for (int i = 0; i < argc; i++) av[3 + i] = argv[i], avlen[3 + i] = argvlen[i];
    return redisAsyncCommandArgv(ac, fn, data, argc + 3, av, avlen) == REDIS_OK ? 0 : -1;
}

static int async_send(redisAsyncContext *ac, sp_script_call *call, redisCallbackFn *fn, void *data,
                      int by_body) {
    if (call->overflow) return -1;
    return sp_redis_async_script(ac, call->script, by_body, call->nkeys, call->argc, call->argv,
                                 call->argvlen, fn, data);
}

int sp_redis_async_call(redisAsyncContext *ac, sp_script_call *call, redisCallbackFn *fn,
                        void *data) {
    return async_send(ac, call, fn, data, 0);
}

int sp_redis_async_call_eval(redisAsyncContext *ac, sp_script_call *call, redisCallbackFn *fn,
                             void *data) {
    return async_send(ac, call, fn, data, 1);
}

int sp_redis_is_noscript(const redisReply *r) {
    return r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0;
}
