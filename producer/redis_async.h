/* redis_async.h - the event loop's connection to the data: one handle over a single Redis server,
 *                 Sentinel's primary or a Redis Cluster, with commands routed by their key.
 *
 * Single server (redis://) and Sentinel (sentinel://): one hiredis async connection, found and
 * checked with a short blocking connect (sp_redis_connect: Sentinel's lookup, ROLE), as before.
 * Redis Cluster (redis-cluster://): the slot map is read from a seed (CLUSTER SLOTS, blocking),
 * then one async connection per primary, opened on first use; each command goes to the primary
 * of its key's slot (common/redis_cluster.h). A node that answers MOVED or ASK ran nothing, so
 * the command is sent again where it points (MOVED also refreshes the map); TRYAGAIN and
 * CLUSTERDOWN are sent again after a short wait, within the command timeout. A script whose SHA
 * a node does not know (NOSCRIPT: restart, failover, SCRIPT FLUSH) is sent again as EVAL with its
 * body, in every mode: callers never see NOSCRIPT.
 *
 * A connection that dies with commands in flight never sends them again: their outcome is
 * unknown, and their callbacks get a NULL reply. Every function runs on the loop's thread only.
 */
#ifndef SP_REDIS_ASYNC_H
#define SP_REDIS_ASYNC_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>

#include "redis_store.h"

struct event_base;

#define SP_REDIS_ASYNC_PENDING_MAX   100000 /* commands owed at once; more are refused */
#define SP_REDIS_ASYNC_REDIRECTS_MAX 5      /* MOVED + ASK per command, then its reply is final */
#define SP_REDIS_ASYNC_RETRY_MS      500    /* a node that failed is not tried again before */

typedef struct sp_redis_async sp_redis_async;

/* The final reply of one command: a value, an error reply of the command itself (or the last
 * redirect when they ran out), or NULL when the connection ended with the command in flight (it
 * may or may not have run). reply belongs to the module and is valid during the call only. */
typedef void sp_redis_async_fn(redisReply *reply, void *data);

/* What the handle did so far (counts since open), for logs, metrics and tests. */
typedef struct sp_redis_async_stats {
    uint64_t moved, ask, retried; /* MOVED and ASK followed, TRYAGAIN / CLUSTERDOWN waited out */
    uint64_t noscript;            /* scripts sent again as EVAL */
    uint64_t lost;                /* commands answered NULL: their connection ended */
    uint64_t connects;            /* node connections opened */
    uint64_t refreshes;           /* slot maps read (cluster) */
} sp_redis_async_stats;

/* Opens the handle for target t (copied) on base and tries to connect at once (blocking, each try
 * bounded by connect_ms). An unreachable server is no error: the handle is then not usable and
 * sp_redis_async_tick tries again every SP_REDIS_ASYNC_RETRY_MS. command_ms bounds the waits of
 * one command (TRYAGAIN, CLUSTERDOWN) and how long a connection may owe replies without answering
 * (then it is dropped). Every node connection sends AUTH with t's password first (and SELECT for
 * a database other than 0). NULL with errbuf only when out of memory. The caller owns the handle
 * (sp_redis_async_close). */
sp_redis_async *sp_redis_async_open(const sp_redis_target *t, struct event_base *base,
                                    int connect_ms, int command_ms, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Calls every pending callback with NULL, exactly once, closes every connection and frees ra.
 * Callbacks run from here cannot send (their sends return -1). Never from inside one of ra's
 * callbacks. NULL is a no-op. */
void sp_redis_async_close(sp_redis_async *ra);

/* Periodic work, from the loop (about every 100 ms): reconnects what is down (at most every
 * SP_REDIS_ASYNC_RETRY_MS; blocking like open), drops a connection that owes replies and has said
 * nothing for command_ms (its commands get NULL), re-reads a cluster's slot map when asked to. */
void sp_redis_async_tick(sp_redis_async *ra);

/* 1 when commands can be sent: the server is connected (single, Sentinel), or the slot map is
 * known and some primary that serves slots did not fail its last connection (cluster: /readyz; a
 * primary's failover makes its slots' commands fail, not every one). */
int sp_redis_async_usable(const sp_redis_async *ra);

/* 1 when a command on key can be sent: as above for one server; a cluster's map names a primary
 * for key's slot and that primary did not fail its last connection. */
int sp_redis_async_usable_for(const sp_redis_async *ra, const char *key);

/* The name of a key of stockpipe's own kept on the primary that serves near's slot (the reaper
 * writes one on every primary, sp_redis_key_on): base itself without a cluster, else base:{N}
 * (sp_cluster_key_on_node). -1 when the map names no primary for near, or none fits in cap. */
int sp_redis_async_key_near(const sp_redis_async *ra, const char *near, const char *base, char *key,
                            size_t cap) __attribute__((warn_unused_result));

/* Commands accepted whose final reply has not come yet. */
int64_t sp_redis_async_owed(const sp_redis_async *ra);

void sp_redis_async_stats_get(const sp_redis_async *ra, sp_redis_async_stats *stats);

/* Sends a command (hiredis's format: %s, %b, ...) for the slot of key (NULL: any node). 0 when
 * accepted: fn(reply, data) is then called exactly once, later (never from inside this call);
 * -1 when not (not usable, over a bound, closing): fn is never called. The command is copied. */
int sp_redis_async_send(sp_redis_async *ra, sp_redis_async_fn *fn, void *data, const char *key,
                        const char *fmt, ...) __attribute__((warn_unused_result));

/* The same for an argument list; key_index is the argument that holds the key (-1: none). */
int sp_redis_async_send_argv(sp_redis_async *ra, sp_redis_async_fn *fn, void *data, int argc,
                             const char *const *argv, const size_t *argvlen, int key_index)
    __attribute__((warn_unused_result));

/* Runs script s (EVALSHA, its SHA-1 computed here when s has none; EVAL again on NOSCRIPT) with
 * nkeys keys then arguments (argc in all, at most SP_REDIS_SCRIPT_ARGV_MAX). It goes to the slot
 * of the first key: every key of one call must share its slot (stockpipe's hash tags). The
 * arguments are copied; s must outlive the call. Returns as sp_redis_async_send. */
int sp_redis_async_eval(sp_redis_async *ra, sp_redis_script *s, int nkeys, int argc,
                        const char *const *argv, const size_t *argvlen, sp_redis_async_fn *fn,
                        void *data) __attribute__((warn_unused_result));

/* The same for a call built with sp_script_call_* (copied: call may go once this returns); -1 for
 * a call whose arguments overflowed. */
int sp_redis_async_eval_call(sp_redis_async *ra, const sp_script_call *call, sp_redis_async_fn *fn,
                             void *data) __attribute__((warn_unused_result));

#endif
