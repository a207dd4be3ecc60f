/* redis_store.c - the blocking connection to Redis (one server, Sentinel's primary or a Redis
 * Cluster) and Lua scripts by EVALSHA. */
#include "redis_store.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "redis_cluster.h"

#define EVALSHA_ARGS_MAX SP_REDIS_SCRIPT_ARGV_MAX

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

/* ---- the blocking connection to the data ---- */

#define REDIRECTS_MAX  16 /* MOVED/ASK hops of one command */
#define RETRY_SLEEP_MS 50 /* first sleep after TRYAGAIN / CLUSTERDOWN; doubles up to 400 */

struct sp_redis {
    sp_redis_target target;
    int timeout_ms;
    redisContext *one;   /* redis://, sentinel://: NULL until (re)connected */
    sp_cluster_map *map; /* redis-cluster:// */
    int map_stale;       /* a node failed: read the map again before the next command */
    redisContext *node[SP_CLUSTER_NODES_MAX]; /* by map index; NULL until used */
};

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A cluster node's connection: TCP, then AUTH. */
static redisContext *node_connect(const sp_redis *r, const char *host, int port, char *errbuf,
                                  size_t errlen) {
    redisContext *c = connect_one(host, port, r->timeout_ms, errbuf, errlen);
    if (c && r->target.password[0] &&
        command_ok(c, errbuf, errlen, "AUTH", "AUTH %s", r->target.password) != 0) {
        redisFree(c);
        return NULL;
    }
    return c;
}

static void node_drop(sp_redis *r, int i) {
    if (r->node[i]) redisFree(r->node[i]);
    r->node[i] = NULL;
    r->map_stale = 1;
}

/* Reads the slot map from a node already connected, else from the known primaries and the seeds
 * in turn. 0 once one answered. */
static int map_refresh(sp_redis *r, char *errbuf, size_t errlen) {
    int nknown = r->map->nnodes;
    for (int pass = 0; pass < 3; pass++) {
        int ncand = pass == 2 ? r->target.nhosts : nknown;
        for (int i = 0; i < ncand; i++) {
            redisContext *c = NULL;
            const char *host;
            int port;
            if (pass == 2) {
                host = r->target.hosts[i].host, port = r->target.hosts[i].port;
            } else {
                if ((pass == 0) != (r->node[i] != NULL)) continue;
                host = r->map->nodes[i].host, port = r->map->nodes[i].port;
            }
            c = pass == 0 ? r->node[i] : node_connect(r, host, port, errbuf, errlen);
            if (c == NULL) continue;
            redisReply *rep = redisCommand(c, "CLUSTER SLOTS");
            int rc = -1;
            if (rep == NULL)
                snprintf(errbuf, errlen, "redis %s:%d: %s", host, port, c->errstr);
            else
                rc = sp_cluster_map_read_slots(r->map, rep, host, errbuf, errlen);
            if (rep) freeReplyObject(rep);
            if (pass == 0 && rep == NULL) node_drop(r, i);
            if (pass != 0) redisFree(c);
            if (rc == 0) {
                r->map_stale = 0;
                return 0;
            }
        }
    }
    return -1;
}

sp_redis *sp_redis_open(const sp_redis_target *t, int timeout_ms, char *errbuf, size_t errlen) {
    sp_redis *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        snprintf(errbuf, errlen, "redis: out of memory");
        return NULL;
    }
    r->target = *t;
    r->timeout_ms = timeout_ms;
    if (!t->cluster) {
        r->one = sp_redis_connect(t, timeout_ms, errbuf, errlen);
        if (r->one != NULL) return r;
    } else if ((r->map = malloc(sizeof(*r->map))) == NULL) {
        snprintf(errbuf, errlen, "redis: out of memory");
    } else {
        sp_cluster_map_clear(r->map);
        if (map_refresh(r, errbuf, errlen) == 0) return r;
    }
    sp_redis_close(r);
    return NULL;
}

void sp_redis_close(sp_redis *r) {
    if (r == NULL) return;
    if (r->one) redisFree(r->one);
    for (int i = 0; i < SP_CLUSTER_NODES_MAX; i++)
        if (r->node[i]) redisFree(r->node[i]);
    free(r->map);
    free(r);
}

int sp_redis_is_cluster(const sp_redis *r) { return r->map != NULL; }

/* The connection to map node i, opened when needed; NULL with errbuf. */
static redisContext *node_conn(sp_redis *r, int i, char *errbuf, size_t errlen) {
    if (r->node[i] == NULL)
        r->node[i] = node_connect(r, r->map->nodes[i].host, r->map->nodes[i].port, errbuf, errlen);
    return r->node[i];
}

/* Sends one formatted command on c (after ASKING when asking) and reads its reply; NULL with
 * errbuf when the connection failed. */
static redisReply *send_one(redisContext *c, int asking, const char *cmd, size_t len,
                            const char *what, char *errbuf, size_t errlen) {
    void *reply = NULL;
    if ((asking && redisAppendCommand(c, "ASKING") != REDIS_OK) ||
        redisAppendFormattedCommand(c, cmd, len) != REDIS_OK)
        goto failed;
    if (asking) {
        if (redisGetReply(c, &reply) != REDIS_OK) goto failed;
        freeReplyObject(reply);
        reply = NULL;
    }
    if (redisGetReply(c, &reply) != REDIS_OK) goto failed;
    return reply;
failed:
    snprintf(errbuf, errlen, "%s: %s", what, c->errstr[0] ? c->errstr : "no reply");
    return NULL;
}

/* A command of the single-server kind: (re)connects when needed. */
static redisReply *one_run(sp_redis *r, const char *cmd, size_t len, const char *what, char *errbuf,
                           size_t errlen) {
    if (r->one == NULL &&
        (r->one = sp_redis_connect(&r->target, r->timeout_ms, errbuf, errlen)) == NULL)
        return NULL;
    redisReply *rep = send_one(r->one, 0, cmd, len, what, errbuf, errlen);
    if (rep == NULL) {
        redisFree(r->one);
        r->one = NULL;
    }
    return rep;
}

/* Runs a formatted command on the primary of slot (-1: the first primary that serves a slot),
 * following the cluster's redirects. */
static redisReply *cluster_run(sp_redis *r, int slot, const char *cmd, size_t len, const char *what,
                               char *errbuf, size_t errlen) {
    int64_t deadline = mono_ms() + r->timeout_ms;
    int asking = 0, nodei = -1, pause = RETRY_SLEEP_MS;
    for (int hop = 0;; hop++) {
        if (hop > REDIRECTS_MAX || (hop > 0 && mono_ms() > deadline)) {
            snprintf(errbuf, errlen, "%s: no node of the cluster took it (%d tries)", what, hop);
            return NULL;
        }
        if (r->map_stale) (void)map_refresh(r, errbuf, errlen);
        if (!asking) {
            nodei = -1;
            for (int s = slot < 0 ? 0 : slot; s < SP_CLUSTER_SLOTS && nodei < 0; s++) {
                nodei = r->map->slot_node[s];
                if (slot >= 0) break;
            }
        }
        if (nodei < 0) { /* unserved: a failover under way */
            r->map_stale = 1;
            sleep_ms(pause);
            pause = pause < 400 ? pause * 2 : pause;
            continue;
        }
        redisContext *c = node_conn(r, nodei, errbuf, errlen);
        if (c == NULL) { /* never sent: safe to try again once the map says where */
            r->map_stale = 1;
            asking = 0;
            sleep_ms(pause);
            pause = pause < 400 ? pause * 2 : pause;
            continue;
        }
        redisReply *rep = send_one(c, asking, cmd, len, what, errbuf, errlen);
        if (rep == NULL) { /* maybe run: never sent again */
            snprintf(errbuf + strlen(errbuf), errlen - strlen(errbuf), " (redis %s:%d)",
                     r->map->nodes[nodei].host, r->map->nodes[nodei].port);
            node_drop(r, nodei);
            return NULL;
        }
        sp_cluster_redirect to;
        sp_cluster_answer a = sp_cluster_answer_of(rep, r->map->nodes[nodei].host, &to);
        if (a == SP_CLUSTER_FINAL) return rep;
        asking = 0;
        if (a == SP_CLUSTER_MOVED || a == SP_CLUSTER_ASK) {
            int to_node = sp_cluster_map_node(r->map, to.host, to.port);
            if (to_node < 0) {
                snprintf(errbuf, errlen, "%s: %s (more nodes than %d)", what, rep->str,
                         SP_CLUSTER_NODES_MAX);
                freeReplyObject(rep);
                return NULL;
            }
            freeReplyObject(rep);
            if (a == SP_CLUSTER_MOVED) {
                slot = to.slot; /* a command sent to any node goes where its key lives */
                r->map->slot_node[to.slot] = (int16_t)to_node;
                r->map_stale = 1; /* likely more slots moved: read the whole map */
            } else {
                nodei = to_node;
                asking = 1;
            }
            continue;
        }
        /* TRYAGAIN, CLUSTERDOWN: the answer itself once time is up */
        if (mono_ms() + pause > deadline) return rep;
        freeReplyObject(rep);
        if (a == SP_CLUSTER_DOWN) r->map_stale = 1;
        sleep_ms(pause);
        pause = pause < 400 ? pause * 2 : pause;
    }
}

static redisReply *run_formatted(sp_redis *r, const char *key, const char *cmd, size_t len,
                                 const char *what, char *errbuf, size_t errlen) {
    if (r->map == NULL) return one_run(r, cmd, len, what, errbuf, errlen);
    int slot = key ? (int)sp_cluster_key_slot(key, strlen(key)) : -1;
    return cluster_run(r, slot, cmd, len, what, errbuf, errlen);
}

redisReply *sp_redis_argv(sp_redis *r, const char *key, int argc, const char **argv,
                          const size_t *argvlen, char *errbuf, size_t errlen) {
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0) {
        snprintf(errbuf, errlen, "%s: out of memory", argc > 0 ? argv[0] : "redis");
        return NULL;
    }
    redisReply *rep = run_formatted(r, key, cmd, (size_t)len, argc > 0 ? argv[0] : "redis", errbuf,
                                    errlen);
    redisFreeCommand(cmd);
    return rep;
}

redisReply *sp_redis_command(sp_redis *r, const char *key, char *errbuf, size_t errlen,
                             const char *fmt, ...) {
    char *cmd = NULL, what[24];
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    snprintf(what, sizeof(what), "%.*s", (int)strcspn(fmt, " "), fmt);
    if (len < 0) {
        snprintf(errbuf, errlen, "%s: out of memory", what);
        return NULL;
    }
    redisReply *rep = run_formatted(r, key, cmd, (size_t)len, what, errbuf, errlen);
    redisFreeCommand(cmd);
    return rep;
}

int sp_redis_pipeline(sp_redis *r, size_t n, const sp_redis_cmd *cmds, redisReply **replies,
                      char *errbuf, size_t errlen) {
    for (size_t i = 0; i < n; i++) replies[i] = NULL;
    if (r->map == NULL) { /* one server: every command out, then every reply */
        if (r->one == NULL &&
            (r->one = sp_redis_connect(&r->target, r->timeout_ms, errbuf, errlen)) == NULL)
            return -1;
        for (size_t i = 0; i < n; i++)
            if (redisAppendCommandArgv(r->one, cmds[i].argc, (const char **)cmds[i].argv, NULL) !=
                REDIS_OK)
                goto failed;
        for (size_t i = 0; i < n; i++) {
            void *reply = NULL;
            if (redisGetReply(r->one, &reply) != REDIS_OK) goto failed;
            replies[i] = reply;
        }
        return 0;
    failed:
        snprintf(errbuf, errlen, "%s: %s", n ? cmds[0].argv[0] : "pipeline", r->one->errstr);
        redisFree(r->one);
        r->one = NULL;
        goto undo;
    }
    /* A cluster: each command on its own, redirects followed (few callers, rare calls). */
    for (size_t i = 0; i < n; i++) {
        replies[i] = sp_redis_argv(r, cmds[i].key, cmds[i].argc, (const char **)cmds[i].argv, NULL,
                                   errbuf, errlen);
        if (replies[i] == NULL) goto undo;
    }
    return 0;
undo:
    for (size_t i = 0; i < n; i++) {
        if (replies[i]) freeReplyObject(replies[i]);
        replies[i] = NULL;
    }
    return -1;
}

/* The map indexes of the nodes that serve a slot (the primaries), in the order of their addresses
 * (host, then port): the same order for every client, and kept by a reshard, which moves slots
 * but changes no primary; their count. */
static int serving(sp_redis *r, int *idx) {
    char seen[SP_CLUSTER_NODES_MAX] = {0};
    int n = 0;
    if (r->map_stale) (void)map_refresh(r, NULL, 0);
    for (int s = 0; s < SP_CLUSTER_SLOTS; s++)
        if (r->map->slot_node[s] >= 0) seen[r->map->slot_node[s]] = 1;
    for (int i = 0; i < r->map->nnodes; i++) {
        if (!seen[i]) continue;
        const sp_cluster_node *a = &r->map->nodes[i];
        int at = n++;
        for (; at > 0; at--) { /* insertion: a few primaries */
            const sp_cluster_node *b = &r->map->nodes[idx[at - 1]];
            int c = strcmp(b->host, a->host);
            if (c < 0 || (c == 0 && b->port < a->port)) break;
            idx[at] = idx[at - 1];
        }
        idx[at] = i;
    }
    return n;
}

int sp_redis_primary_of(sp_redis *r, const char *key) {
    int idx[SP_CLUSTER_NODES_MAX];
    if (r->map == NULL) return 0;
    int n = serving(r, idx), node = r->map->slot_node[sp_cluster_key_slot(key, strlen(key))];
    for (int i = 0; i < n; i++)
        if (idx[i] == node) return i;
    return -1;
}

int sp_redis_primaries(sp_redis *r) {
    int idx[SP_CLUSTER_NODES_MAX];
    return r->map == NULL ? 1 : serving(r, idx);
}

redisReply *sp_redis_argv_on(sp_redis *r, int i, int argc, const char **argv, char *errbuf,
                             size_t errlen) {
    int idx[SP_CLUSTER_NODES_MAX];
    if (r->map == NULL) return sp_redis_argv(r, NULL, argc, argv, NULL, errbuf, errlen);
    if (i < 0 || i >= serving(r, idx)) {
        snprintf(errbuf, errlen, "%s: no primary %d in the cluster's map", argv[0], i);
        return NULL;
    }
    redisContext *c = node_conn(r, idx[i], errbuf, errlen);
    if (c == NULL) {
        r->map_stale = 1;
        return NULL;
    }
    redisReply *rep = redisCommandArgv(c, argc, argv, NULL);
    if (rep == NULL) {
        snprintf(errbuf, errlen, "%s: %s (redis %s:%d)", argv[0], c->errstr,
                 r->map->nodes[idx[i]].host, r->map->nodes[idx[i]].port);
        node_drop(r, idx[i]);
    }
    return rep;
}

int sp_redis_key_on(sp_redis *r, int i, const char *base, char *key, size_t cap, char *errbuf,
                    size_t errlen) {
    int idx[SP_CLUSTER_NODES_MAX];
    if (r->map == NULL) {
        if (snprintf(key, cap, "%s", base) < (int)cap) return 0;
    } else if (i >= 0 && i < serving(r, idx) &&
               sp_cluster_key_on_node(r->map, idx[i], base, key, cap) == 0) {
        return 0;
    }
    snprintf(errbuf, errlen, "no key %s:{N} found for primary %d", base, i);
    return -1;
}

int sp_redis_ping(sp_redis *r, char *errbuf, size_t errlen) {
    const char *ping[] = {"PING"};
    int n = sp_redis_primaries(r);
    if (n == 0) {
        snprintf(errbuf, errlen, "PING: the cluster's map names no primary");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        redisReply *rep = sp_redis_argv_on(r, i, 1, ping, errbuf, errlen);
        int ok = rep && rep->type == REDIS_REPLY_STATUS && strcmp(rep->str, "PONG") == 0;
        if (rep && !ok)
            snprintf(errbuf, errlen, "PING: unexpected reply %s",
                     rep->type == REDIS_REPLY_ERROR ? rep->str : "");
        if (rep) freeReplyObject(rep);
        if (!ok) return -1;
    }
    return 0;
}

int sp_redis_script_load(sp_redis *r, sp_redis_script *s, char *errbuf, size_t errlen) {
    const char *load[] = {"SCRIPT", "LOAD", s->body};
    int n = sp_redis_primaries(r);
    if (n == 0) {
        snprintf(errbuf, errlen, "SCRIPT LOAD %s: the cluster's map names no primary", s->name);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        redisReply *rep = sp_redis_argv_on(r, i, 3, load, errbuf, errlen);
        if (rep == NULL) return -1;
        int ok = rep->type == REDIS_REPLY_STRING && rep->len == 40;
        if (ok) {
            memcpy(s->sha, rep->str, 40);
            s->sha[40] = '\0';
        } else {
            snprintf(errbuf, errlen, "SCRIPT LOAD %s: %s", s->name,
                     rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
        }
        freeReplyObject(rep);
        if (!ok) return -1;
    }
    return 0;
}

redisReply *sp_redis_evalsha(sp_redis *r, sp_redis_script *s, int nkeys, int argc,
                             const char **argv, const size_t *argvlen, char *errbuf,
                             size_t errlen) {
    const char *av[EVALSHA_ARGS_MAX + 3];
    size_t avlen[EVALSHA_ARGS_MAX + 3];
    char nkeystext[12];
    if (argc < 0 || argc > EVALSHA_ARGS_MAX || nkeys < 0 || nkeys > argc) {
        snprintf(errbuf, errlen, "EVALSHA %s: bad argument count", s->name);
        return NULL;
    }
    if (s->sha[0] == '\0' && sp_redis_script_load(r, s, errbuf, errlen) != 0) return NULL;
    snprintf(nkeystext, sizeof(nkeystext), "%d", nkeys);
    av[0] = "EVALSHA", avlen[0] = 7;
    av[1] = s->sha, avlen[1] = 40;
    av[2] = nkeystext, avlen[2] = strlen(nkeystext);
    for (int i = 0; i < argc; i++)
        av[3 + i] = argv[i], avlen[3 + i] = argvlen ? argvlen[i] : strlen(argv[i]);
    const char *key = nkeys > 0 ? argv[0] : NULL;
    redisReply *rep = sp_redis_argv(r, key, argc + 3, av, avlen, errbuf, errlen);
    if (rep == NULL || !sp_redis_is_noscript(rep)) return rep;
    /* That server lost its script cache (a restart, a failover): EVAL runs the body and caches
     * it again. */
    freeReplyObject(rep);
    av[0] = "EVAL", avlen[0] = 4;
    av[1] = s->body, avlen[1] = strlen(s->body);
    return sp_redis_argv(r, key, argc + 3, av, avlen, errbuf, errlen);
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

redisReply *sp_redis_call(sp_redis *r, sp_script_call *call, char *errbuf, size_t errlen) {
    if (call->overflow) {
        snprintf(errbuf, errlen, "script %s: arguments over the bound", call->script->name);
        return NULL;
    }
    return sp_redis_evalsha(r, call->script, call->nkeys, call->argc, call->argv, call->argvlen,
                            errbuf, errlen);
}

int sp_redis_is_noscript(const redisReply *r) {
    return r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0;
}
