/* redis_async.c - the event loop's connection to the data: single server, Sentinel's primary or a
 *                 Redis Cluster behind one handle; redirects and NOSCRIPT are handled here. */
#include "redis_async.h"

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "redis_cluster.h"

#define WAIT_FIRST_MS    20  /* TRYAGAIN / CLUSTERDOWN: the first wait, then doubled... */
#define WAIT_MAX_MS      200 /* ...up to this, while the command's deadline allows */
#define REFRESH_EVERY_MS 100 /* a cluster's slot map is asked for at most this often */

/* One server the handle talks to: the single server, or a cluster primary (its index in the slot
 * map is its index in ra->nodes). */
typedef struct node {
    sp_redis_async *ra; /* NULL: the slot not in use */
    char host[256];
    int port;
    redisAsyncContext *ac; /* NULL while not connected */
    int failed;   /* its last connection failed or ended: a cluster is not usable while a node that
                   * serves slots has this (a new connection's first success clears it) */
    int serves;   /* cluster: the map gives it slots */
    int64_t owed; /* replies owed on ac: the stall watchdog measures from the last reply */
    int64_t last_reply_ms;
    int64_t retry_ms; /* no new connection before this */
} node;

/* One caller's command, from its send until its final reply. */
typedef struct pending {
    sp_redis_async *ra;
    struct pending *prev, *next; /* in ra's list: close answers every one */
    sp_redis_async_fn *fn;
    void *data;
    char *cmd; /* the formatted command, kept for resends until the final reply */
    size_t len;
    sp_redis_script *script; /* a script: sent again as EVAL on NOSCRIPT, once */
    int evaled;
    int slot; /* -1: no key */
    int redirects;
    int asking;          /* the last send went after ASKING: a resend there needs it again */
    int64_t deadline_ms; /* TRYAGAIN / CLUSTERDOWN are waited out until then */
    int wait_ms;
    struct event *timer; /* armed while waiting to resend */
    char last_err[160];  /* the redirect a timed resend answers with when it cannot go */
} pending;

struct sp_redis_async {
    struct event_base *base;
    sp_redis_target target;
    int connect_ms, command_ms;
    int closing;
    int have_map;       /* cluster: the slot map was read once */
    int refreshing;     /* cluster: a CLUSTER SLOTS is under way */
    int refresh_wanted; /* cluster: the map may be stale (MOVED, a node lost, CLUSTERDOWN) */
    int unserved;       /* cluster: slots the map names no primary for (asked again each tick) */
    int64_t refresh_next_ms, load_next_ms;
    sp_cluster_map map;
    node nodes[SP_CLUSTER_NODES_MAX]; /* single / Sentinel: nodes[0] only */
    pending *head;
    int64_t npending;
    sp_redis_async_stats stats;
};

/* ---- SHA-1 (FIPS 180-1): a script's name for EVALSHA, without a SCRIPT LOAD round trip ---- */

static uint32_t rol(uint32_t v, int n) { return (v << n) | (v >> (32 - n)); }

static void sha1_hex(const char *msg, size_t len, char out[41]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64; /* the message, 0x80, zeros, 8 bytes of length */
    uint64_t bits = (uint64_t)len * 8;
    for (size_t off = 0; off < total; off += 64) {
        unsigned char b[64];
        uint32_t w[80], a, bb, c, d, e;
        for (size_t i = 0; i < 64; i++) {
            size_t k = off + i;
            b[i] = k < len ? (unsigned char)msg[k] : k == len ? 0x80 : 0;
        }
        if (off + 64 == total)
            for (int i = 0; i < 8; i++) b[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)b[4 * i] << 24 | (uint32_t)b[4 * i + 1] << 16 |
                   (uint32_t)b[4 * i + 2] << 8 | (uint32_t)b[4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20)
                f = (bb & c) | (~bb & d), k = 0x5A827999;
            else if (i < 40)
                f = bb ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60)
                f = (bb & c) | (bb & d) | (c & d), k = 0x8F1BBCDC;
            else
                f = bb ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rol(bb, 30), bb = a, a = t;
        }
        h[0] += a, h[1] += bb, h[2] += c, h[3] += d, h[4] += e;
    }
    for (int i = 0; i < 5; i++) snprintf(out + 8 * i, 9, "%08x", h[i]);
}

/* ---- nodes ---- */

static int nnodes(const sp_redis_async *ra) { return ra->target.cluster ? ra->map.nnodes : 1; }

static int ac_open(const redisAsyncContext *ac) {
    return !(ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* The node's connection is gone (ac was it): the node failed; a cluster re-reads its map. */
static void node_lost(node *n, const redisAsyncContext *ac) {
    if (n->ac != ac) return;
    n->ac = NULL;
    n->failed = 1;
    n->owed = 0;
    if (n->ra->target.cluster && !n->ra->closing) n->ra->refresh_wanted = 1;
}

static void on_connect(const redisAsyncContext *ac, int status) {
    node *n = ac->data;
    if (status == REDIS_OK) {
        n->failed = 0;
        return;
    }
    if (!n->ra->closing) sp_warn("redis %s:%d: cannot connect: %s", n->host, n->port, ac->errstr);
    node_lost(n, ac); /* hiredis now calls what was queued with NULL */
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
    node *n = ac->data;
    (void)status;
    if (n->ac == ac && !n->ra->closing)
        sp_warn("redis %s:%d: connection lost: %s", n->host, n->port,
                ac->errstr[0] ? ac->errstr : "closed");
    node_lost(n, ac);
}

/* Opens n's async connection to host:port (non-blocking), AUTH and SELECT queued first. */
static int node_connect(node *n, const char *host, int port) {
    sp_redis_async *ra = n->ra;
    n->retry_ms = sp_clock_mono_ms() + SP_REDIS_ASYNC_RETRY_MS;
    if (host != n->host) memmove(n->host, host, strnlen(host, sizeof(n->host) - 1) + 1);
    n->port = port;
    redisAsyncContext *ac = redisAsyncConnect(host, port);
    if (ac == NULL || ac->err) {
        sp_warn("redis %s:%d: %s", host, port, ac ? ac->errstr : "out of memory");
        if (ac) redisAsyncFree(ac);
        n->failed = 1;
        return -1;
    }
    ac->data = n;
    if (redisLibeventAttach(ac, ra->base) != REDIS_OK) {
        sp_warn("redis %s:%d: cannot attach to the event loop", host, port);
        redisAsyncFree(ac);
        n->failed = 1;
        return -1;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    if (ra->target.password[0]) redisAsyncCommand(ac, NULL, NULL, "AUTH %s", ra->target.password);
    if (ra->target.db) redisAsyncCommand(ac, NULL, NULL, "SELECT %d", ra->target.db);
    /* hiredis 0.14 finishes a connect (and calls on_connect, which clears n->failed) only when
     * it has something to write: a reconnect from the tick, with no command waiting, would
     * otherwise leave the node failed, and the handle unusable, for good. */
    redisAsyncCommand(ac, NULL, NULL, "PING");
    n->ac = ac;
    n->owed = 0;
    ra->stats.connects++;
    return 0;
}

/* Single server or Sentinel: finds (and checks) the primary with a short blocking connection, as
 * the address changes on failover and a stale one would only answer READONLY; then connects. */
static int single_connect(sp_redis_async *ra) {
    node *n = &ra->nodes[0];
    char err[512], host[256];
    n->retry_ms = sp_clock_mono_ms() + SP_REDIS_ASYNC_RETRY_MS;
    redisContext *probe = sp_redis_connect(&ra->target, ra->connect_ms, err, sizeof(err));
    if (probe == NULL) {
        sp_warn("redis unavailable: %s", err);
        n->failed = 1;
        return -1;
    }
    snprintf(host, sizeof(host), "%s", probe->tcp.host);
    int port = probe->tcp.port;
    redisFree(probe);
    if (node_connect(n, host, port) != 0) return -1;
    sp_info("redis %s:%d connected", host, port);
    return 0;
}

/* n's connection for a send, opened when there is none (not before n->retry_ms); NULL when n
 * cannot take commands now. */
static redisAsyncContext *node_ac(sp_redis_async *ra, node *n) {
    if (n->ac) return ac_open(n->ac) ? n->ac : NULL;
    if (ra->closing || sp_clock_mono_ms() < n->retry_ms) return NULL;
    if (!ra->target.cluster) return single_connect(ra) == 0 ? n->ac : NULL;
    return node_connect(n, n->host, n->port) == 0 ? n->ac : NULL;
}

/* The map named new nodes (it only ever adds them): give each its slot in ra->nodes; then count
 * which serve slots. */
static void map_changed(sp_redis_async *ra) {
    for (int i = 0; i < ra->map.nnodes; i++) {
        node *n = &ra->nodes[i];
        if (n->ra == NULL) {
            n->ra = ra;
            _Static_assert(sizeof(n->host) == sizeof(ra->map.nodes[i].host), "host sizes");
            memcpy(n->host, ra->map.nodes[i].host, sizeof(n->host));
            n->port = ra->map.nodes[i].port;
        }
        n->serves = 0;
    }
    ra->unserved = 0;
    for (int s = 0; s < SP_CLUSTER_SLOTS; s++) {
        if (ra->map.slot_node[s] >= 0)
            ra->nodes[ra->map.slot_node[s]].serves = 1;
        else
            ra->unserved++;
    }
}

/* The node a command for slot goes to (slot -1: a serving node, a connected one if any); NULL
 * when none is known. */
static node *node_for(sp_redis_async *ra, int slot) {
    if (!ra->target.cluster) return &ra->nodes[0];
    if (!ra->have_map) return NULL;
    if (slot >= 0) return ra->map.slot_node[slot] >= 0 ? &ra->nodes[ra->map.slot_node[slot]] : NULL;
    node *any = NULL;
    for (int i = 0; i < ra->map.nnodes; i++) {
        node *n = &ra->nodes[i];
        if (!n->serves) continue;
        if (n->ac && ac_open(n->ac)) return n;
        if (any == NULL && !n->failed) any = n;
    }
    return any;
}

/* ---- the slot map ---- */

/* Reads the map from the seeds, blocking (open, and when no known node can be asked). */
static int map_load(sp_redis_async *ra) {
    char err[512] = "no seed";
    ra->load_next_ms = sp_clock_mono_ms() + SP_REDIS_ASYNC_RETRY_MS;
    for (int i = 0; i < ra->target.nhosts; i++) {
        sp_redis_target one = {.nhosts = 1};
        snprintf(one.hosts[0].host, sizeof(one.hosts[0].host), "%s", ra->target.hosts[i].host);
        one.hosts[0].port = ra->target.hosts[i].port;
        snprintf(one.password, sizeof(one.password), "%s", ra->target.password);
        redisContext *c = sp_redis_connect(&one, ra->connect_ms, err, sizeof(err));
        if (c == NULL) continue;
        redisReply *r = redisCommand(c, "CLUSTER SLOTS");
        int rc = -1;
        if (r == NULL)
            snprintf(err, sizeof(err), "redis %s:%d: %s", one.hosts[0].host, one.hosts[0].port,
                     c->errstr);
        else
            rc = sp_cluster_map_read_slots(&ra->map, r, one.hosts[0].host, err, sizeof(err));
        if (r) freeReplyObject(r);
        redisFree(c);
        if (rc == 0) {
            map_changed(ra);
            if (!ra->have_map) sp_info("redis cluster: slot map read, %d nodes", ra->map.nnodes);
            ra->have_map = 1;
            ra->refresh_wanted = 0;
            ra->stats.refreshes++;
            return 0;
        }
    }
    sp_warn("redis cluster: no seed gave the slot map: %s", err);
    return -1;
}

static void on_slots(redisAsyncContext *ac, void *reply, void *privdata) {
    sp_redis_async *ra = privdata;
    node *n = ac->data;
    char err[256];
    if (n->ac == ac) n->owed--, n->last_reply_ms = sp_clock_mono_ms();
    ra->refreshing = 0;
    if (reply == NULL || ra->closing) return;
    if (sp_cluster_map_read_slots(&ra->map, reply, n->host, err, sizeof(err)) != 0) {
        sp_warn("redis cluster %s:%d: %s", n->host, n->port, err);
        return;
    }
    map_changed(ra);
    ra->refresh_wanted = 0;
    ra->stats.refreshes++;
}

/* Asks a node for the slot map when it is wanted (at most every REFRESH_EVERY_MS). -1 when no
 * known node can be asked (the caller may go to the seeds). */
static int refresh_start(sp_redis_async *ra) {
    int64_t now = sp_clock_mono_ms();
    if (!ra->target.cluster || ra->closing || !ra->have_map || ra->refreshing ||
        !ra->refresh_wanted || now < ra->refresh_next_ms)
        return 0;
    node *ask = NULL;
    for (int i = 0; i < ra->map.nnodes && ask == NULL; i++)
        if (ra->nodes[i].ac && ac_open(ra->nodes[i].ac)) ask = &ra->nodes[i];
    for (int i = 0; i < ra->map.nnodes && ask == NULL; i++)
        if (!ra->nodes[i].failed && now >= ra->nodes[i].retry_ms) ask = &ra->nodes[i];
    if (ask == NULL) return -1;
    ra->refresh_next_ms = now + REFRESH_EVERY_MS;
    redisAsyncContext *ac = node_ac(ra, ask);
    if (ac == NULL || redisAsyncCommand(ac, on_slots, ra, "CLUSTER SLOTS") != REDIS_OK) return -1;
    if (ask->owed++ == 0) ask->last_reply_ms = now;
    ra->refreshing = 1;
    return 0;
}

static void refresh_soon(sp_redis_async *ra) {
    ra->refresh_wanted = 1;
    (void)refresh_start(ra);
}

/* ---- commands ---- */

static void pending_unlink(pending *p) {
    sp_redis_async *ra = p->ra;
    if (p->prev)
        p->prev->next = p->next;
    else
        ra->head = p->next;
    if (p->next) p->next->prev = p->prev;
    ra->npending--;
}

static void pending_free(pending *p) {
    if (p->timer) event_free(p->timer);
    free(p->cmd);
    free(p);
}

/* The final reply: the caller hears it once, then p is gone. */
static void finish(pending *p, redisReply *r) {
    pending_unlink(p);
    p->fn(r, p->data);
    pending_free(p);
}

/* The same with an error reply made from text (a redirect that could not be followed later). */
static void finish_error(pending *p, const char *text) {
    redisReply r = {.type = REDIS_REPLY_ERROR, .str = (char *)text, .len = strlen(text)};
    finish(p, &r);
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Sends p to n (after ASKING when asking); -1 when n cannot take it now. */
static int send_to(pending *p, node *n, int asking) {
    redisAsyncContext *ac = node_ac(p->ra, n);
    if (ac == NULL) return -1;
    if (asking && redisAsyncCommand(ac, NULL, NULL, "ASKING") != REDIS_OK) return -1;
    if (redisAsyncFormattedCommand(ac, on_reply, p, p->cmd, p->len) != REDIS_OK) return -1;
    if (n->owed++ == 0) n->last_reply_ms = sp_clock_mono_ms();
    p->asking = asking;
    return 0;
}

/* Where the arguments after the first two begin in a formatted command. */
static size_t after_two_args(const char *cmd) {
    const char *p = strstr(cmd, "\r\n") + 2; /* "*N\r\n" */
    for (int i = 0; i < 2; i++) {
        size_t n = strtoul(p + 1, NULL, 10);
        p = strstr(p, "\r\n") + 2 + n + 2; /* "$n\r\n" the bytes "\r\n" */
    }
    return (size_t)(p - cmd);
}

/* Rewrites p's EVALSHA as EVAL with the script's body (same keys and arguments). */
static int to_eval(pending *p) {
    const char *body = p->script->body;
    size_t blen = strlen(body), rest = after_two_args(p->cmd);
    const char *first_end = strstr(p->cmd, "\r\n") + 2;
    size_t head = (size_t)(first_end - p->cmd);
    char lenline[32];
    int ll = snprintf(lenline, sizeof(lenline), "$4\r\nEVAL\r\n$%zu\r\n", blen);
    size_t len = head + (size_t)ll + blen + 2 + (p->len - rest);
    char *cmd = malloc(len);
    if (cmd == NULL) return -1;
    char *w = cmd;
    memcpy(w, p->cmd, head), w += head;
    memcpy(w, lenline, (size_t)ll), w += ll;
    memcpy(w, body, blen), w += blen;
    memcpy(w, "\r\n", 2), w += 2;
    memcpy(w, p->cmd + rest, p->len - rest);
    free(p->cmd);
    p->cmd = cmd;
    p->len = len;
    return 0;
}

static void on_wait_over(evutil_socket_t fd, short what, void *arg) {
    pending *p = arg;
    (void)fd, (void)what;
    node *n = node_for(p->ra, p->slot);
    if (n == NULL || send_to(p, n, 0) != 0) finish_error(p, p->last_err);
}

/* A cluster node refused r for p (MOVED, ASK, TRYAGAIN, CLUSTERDOWN): it ran nothing, so p goes
 * again where the reply points, or later. 0 when r is p's final reply. */
static int follow(pending *p, node *n, const redisReply *r) {
    sp_redis_async *ra = p->ra;
    sp_cluster_redirect to;
    sp_cluster_answer a = sp_cluster_answer_of(r, n->host, &to);
    if (a == SP_CLUSTER_FINAL) return 0;
    if (a == SP_CLUSTER_MOVED || a == SP_CLUSTER_ASK) {
        if (p->redirects >= SP_REDIS_ASYNC_REDIRECTS_MAX) return 0;
        p->redirects++;
        int i = sp_cluster_map_node(&ra->map, to.host, to.port);
        if (i < 0) return 0;
        map_changed(ra);
        if (a == SP_CLUSTER_MOVED) {
            ra->map.slot_node[to.slot] = (int16_t)i;
            ra->nodes[i].serves = 1;
            ra->stats.moved++;
            refresh_soon(ra); /* a moved slot seldom moves alone */
        } else {
            ra->stats.ask++; /* the map stays: only this command goes there, once */
        }
        return send_to(p, &ra->nodes[i], a == SP_CLUSTER_ASK) == 0;
    }
    if (a == SP_CLUSTER_DOWN) refresh_soon(ra);
    int wait = p->wait_ms ? p->wait_ms * 2 : WAIT_FIRST_MS;
    if (wait > WAIT_MAX_MS) wait = WAIT_MAX_MS;
    if (sp_clock_mono_ms() + wait > p->deadline_ms) return 0;
    if (p->timer == NULL) p->timer = evtimer_new(ra->base, on_wait_over, p);
    if (p->timer == NULL) return 0;
    struct timeval tv = {wait / 1000, (wait % 1000) * 1000};
    if (evtimer_add(p->timer, &tv) != 0) return 0;
    p->wait_ms = wait;
    snprintf(p->last_err, sizeof(p->last_err), "%s", r->str);
    ra->stats.retried++;
    return 1;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata) {
    node *n = ac->data;
    pending *p = privdata;
    sp_redis_async *ra = p->ra;
    redisReply *r = reply;
    if (n->ac == ac) n->owed--, n->last_reply_ms = sp_clock_mono_ms();
    if (r == NULL) { /* the connection ended with p in flight: its outcome is unknown */
        ra->stats.lost++;
        finish(p, NULL);
        return;
    }
    if (ra->closing) { /* unreachable: close frees the connections, which answers NULL */
        finish(p, r);
        return;
    }
    if (ra->target.cluster && follow(p, n, r)) return;
    if (p->script && !p->evaled && sp_redis_is_noscript(r)) {
        /* The node lost its script cache (restart, failover, SCRIPT FLUSH): EVAL runs the call
         * and caches the script under the same SHA, so later calls go on with EVALSHA. */
        p->evaled = 1;
        ra->stats.noscript++;
        if (to_eval(p) == 0 && send_to(p, n, p->asking) == 0) return;
    }
    if (r->type == REDIS_REPLY_ERROR &&
        (strncmp(r->str, "READONLY", 8) == 0 || strncmp(r->str, "NOREPLICAS", 10) == 0) &&
        n->ac == ac && ac_open(ac)) {
        /* A demoted primary (failover), or one that lost its replicas (with min-replicas-to-write,
         * what Sentinel has just replaced sees until it is demoted): drop it; what it owes still
         * arrives, the next connection asks Sentinel (or the cluster's map) again. */
        sp_warn("redis %s:%d: %s; reconnecting", n->host, n->port, r->str);
        redisAsyncDisconnect(ac);
        if (ra->target.cluster) refresh_soon(ra);
    }
    finish(p, r);
}

/* Takes cmd (formatted, len bytes) as a new command for slot and sends it; -1 (cmd freed, fn
 * never called) when it cannot go now. */
static int submit(sp_redis_async *ra, sp_redis_async_fn *fn, void *data, char *cmd, int len,
                  int slot, sp_redis_script *script) {
    pending *p = NULL;
    node *n;
    if (len < 0 || cmd == NULL) goto refused;
    if (ra->closing || ra->npending >= SP_REDIS_ASYNC_PENDING_MAX) goto refused;
    p = calloc(1, sizeof(*p));
    if (p == NULL) goto refused;
    p->ra = ra, p->fn = fn, p->data = data, p->cmd = cmd, p->len = (size_t)len;
    p->slot = ra->target.cluster ? slot : -1;
    p->script = script;
    p->deadline_ms = sp_clock_mono_ms() + ra->command_ms;
    p->next = ra->head;
    if (ra->head) ra->head->prev = p;
    ra->head = p;
    ra->npending++;
    n = node_for(ra, p->slot);
    if (n != NULL && send_to(p, n, 0) == 0) return 0;
    pending_unlink(p);
    pending_free(p);
    return -1;
refused:
    free(cmd);
    return -1;
}

static int slot_of(const char *key, size_t len) {
    return key ? (int)sp_cluster_key_slot(key, len) : -1;
}

int sp_redis_async_send(sp_redis_async *ra, sp_redis_async_fn *fn, void *data, const char *key,
                        const char *fmt, ...) {
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    return submit(ra, fn, data, cmd, len, slot_of(key, key ? strlen(key) : 0), NULL);
}

int sp_redis_async_send_argv(sp_redis_async *ra, sp_redis_async_fn *fn, void *data, int argc,
                             const char *const *argv, const size_t *argvlen, int key_index) {
    char *cmd = NULL;
    if (key_index >= argc) return -1;
    int len = redisFormatCommandArgv(&cmd, argc, (const char **)argv, argvlen);
    int slot = key_index >= 0 ? slot_of(argv[key_index], argvlen[key_index]) : -1;
    return submit(ra, fn, data, cmd, len, slot, NULL);
}

int sp_redis_async_eval(sp_redis_async *ra, sp_redis_script *s, int nkeys, int argc,
                        const char *const *argv, const size_t *argvlen, sp_redis_async_fn *fn,
                        void *data) {
    const char *av[SP_REDIS_SCRIPT_ARGV_MAX + 3];
    size_t avlen[SP_REDIS_SCRIPT_ARGV_MAX + 3];
    char nk[12], *cmd = NULL;
    if (argc < 0 || argc > SP_REDIS_SCRIPT_ARGV_MAX || nkeys < 0 || nkeys > argc) return -1;
    if (s->sha[0] == '\0') sha1_hex(s->body, strlen(s->body), s->sha);
    snprintf(nk, sizeof(nk), "%d", nkeys);
    av[0] = "EVALSHA", avlen[0] = 7;
    av[1] = s->sha, avlen[1] = 40;
    av[2] = nk, avlen[2] = strlen(nk);
    for (int i = 0; i < argc; i++) av[3 + i] = argv[i], avlen[3 + i] = argvlen[i];
    int len = redisFormatCommandArgv(&cmd, argc + 3, av, avlen);
    int slot = nkeys > 0 ? slot_of(argv[0], argvlen[0]) : -1;
    return submit(ra, fn, data, cmd, len, slot, s);
}

int sp_redis_async_eval_call(sp_redis_async *ra, const sp_script_call *call, sp_redis_async_fn *fn,
                             void *data) {
    if (call->overflow) return -1;
    return sp_redis_async_eval(ra, call->script, call->nkeys, call->argc, call->argv, call->argvlen,
                               fn, data);
}

/* ---- the handle ---- */

sp_redis_async *sp_redis_async_open(const sp_redis_target *t, struct event_base *base,
                                    int connect_ms, int command_ms, char *errbuf, size_t errlen) {
    sp_redis_async *ra = calloc(1, sizeof(*ra));
    if (ra == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    ra->base = base;
    ra->target = *t;
    ra->connect_ms = connect_ms;
    ra->command_ms = command_ms;
    sp_cluster_map_clear(&ra->map);
    if (t->cluster) {
        (void)map_load(ra);
    } else {
        ra->nodes[0].ra = ra;
        (void)single_connect(ra);
    }
    return ra;
}

void sp_redis_async_close(sp_redis_async *ra) {
    if (ra == NULL) return;
    ra->closing = 1;
    for (int i = 0; i < nnodes(ra); i++) {
        redisAsyncContext *ac = ra->nodes[i].ac;
        ra->nodes[i].ac = NULL;
        if (ac) redisAsyncFree(ac); /* what it owes is answered NULL now */
    }
    while (ra->head) finish(ra->head, NULL); /* those waiting for a resend */
    free(ra);
}

void sp_redis_async_tick(sp_redis_async *ra) {
    int64_t now = sp_clock_mono_ms();
    for (int i = 0; i < nnodes(ra); i++) {
        node *n = &ra->nodes[i];
        if (n->ac == NULL || n->owed <= 0 || now - n->last_reply_ms <= ra->command_ms) continue;
        /* The node stopped answering without closing: what it owes is answered NULL (its
         * outcome is unknown; never sent again) and the next use connects afresh. */
        sp_warn("redis %s:%d owes %lld replies for %d ms; reconnecting", n->host, n->port,
                (long long)n->owed, ra->command_ms);
        redisAsyncContext *ac = n->ac;
        node_lost(n, ac);
        redisAsyncFree(ac);
    }
    if (!ra->target.cluster) {
        if (ra->nodes[0].ac == NULL && now >= ra->nodes[0].retry_ms) (void)single_connect(ra);
        return;
    }
    if (!ra->have_map) {
        if (now >= ra->load_next_ms) (void)map_load(ra);
        return;
    }
    /* Slots no primary serves (a node that lost everything rejoins, a failover under way) are
     * served again once someone takes them: until the map says so, ask for it again. */
    if (ra->unserved > 0) ra->refresh_wanted = 1;
    for (int i = 0; i < ra->map.nnodes; i++) {
        node *n = &ra->nodes[i];
        if (!n->serves || !n->failed) continue;
        /* A primary that failed: ask for the map (a replica may have taken over), and try it
         * again, so that readiness comes back without waiting for a command to need it. */
        ra->refresh_wanted = 1;
        if (n->ac == NULL && now >= n->retry_ms) (void)node_connect(n, n->host, n->port);
    }
    if (refresh_start(ra) != 0 && now >= ra->load_next_ms) (void)map_load(ra);
}

int sp_redis_async_usable(const sp_redis_async *ra) {
    if (!ra->target.cluster) return ra->nodes[0].ac != NULL && ac_open(ra->nodes[0].ac);
    if (!ra->have_map) return 0;
    for (int i = 0; i < ra->map.nnodes; i++)
        if (ra->nodes[i].serves && !ra->nodes[i].failed) return 1;
    return 0;
}

int sp_redis_async_usable_for(const sp_redis_async *ra, const char *key) {
    if (!ra->target.cluster) return sp_redis_async_usable(ra);
    if (!ra->have_map) return 0;
    int i = ra->map.slot_node[sp_cluster_key_slot(key, strlen(key))];
    return i >= 0 && !ra->nodes[i].failed;
}

int sp_redis_async_key_near(const sp_redis_async *ra, const char *near, const char *base, char *key,
                            size_t cap) {
    if (!ra->target.cluster) return snprintf(key, cap, "%s", base) < (int)cap ? 0 : -1;
    if (!ra->have_map) return -1;
    int owner = ra->map.slot_node[sp_cluster_key_slot(near, strlen(near))];
    return sp_cluster_key_on_node(&ra->map, owner, base, key, cap);
}

int64_t sp_redis_async_owed(const sp_redis_async *ra) { return ra->npending; }

void sp_redis_async_stats_get(const sp_redis_async *ra, sp_redis_async_stats *stats) {
    *stats = ra->stats;
}
