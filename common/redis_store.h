/* redis_store.h - the blocking connection to Redis (one server, Sentinel's primary or a Redis
 * Cluster) and Lua scripts by EVALSHA. */
#ifndef SP_REDIS_STORE_H
#define SP_REDIS_STORE_H

#include <hiredis/hiredis.h>
#include <stddef.h>

#define SP_REDIS_HOSTS_MAX 8

/* Where Redis is, parsed from REDIS_URL:
 *   redis://[:password@]host[:port][/db]
 *   sentinel://[:password@]host:port[,host:port...]/master_name[/db]
 *   redis-cluster://[:password@]host:port[,host:port...]
 * With Sentinel the hosts are Sentinels and the primary is looked up on every connect. With a
 * Redis Cluster the hosts are seeds: any node that answers CLUSTER SLOTS gives the slot map, and
 * every command goes to the primary of its key's slot (common/redis_cluster.h). */
typedef struct sp_redis_target {
    int sentinel;
    int cluster;
    int nhosts;
    struct {
        char host[256];
        int port;
    } hosts[SP_REDIS_HOSTS_MAX];
    char master[128];   /* Sentinel's name of the primary */
    char password[128]; /* AUTH for the data server; empty = none */
    int db;
} sp_redis_target;

/* Parses url into *t. -1 with the reason in errbuf. */
int sp_redis_parse_url(const char *url, sp_redis_target *t, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* One server's connection, for what must talk to that one server (the event loop's async
 * connection finds it so): connects (Sentinel: asks each Sentinel in turn for the primary and
 * checks that it says it is one), authenticates, selects the db and sets timeout_ms on connect
 * and on every command. Returns a context the caller owns (redisFree), or NULL with the reason in
 * errbuf; a redis-cluster:// target is refused (use sp_redis_open). */
redisContext *sp_redis_connect(const sp_redis_target *t, int timeout_ms, char *errbuf,
                               size_t errlen) __attribute__((warn_unused_result));

/* ---- the blocking connection to the data (consumer, reaper, tools) ---- */

/* Whatever serves the data: one server (redis://), the primary Sentinel names (sentinel://), or a
 * Redis Cluster (redis-cluster://), where each command goes to the primary of its key's slot:
 * the slot map is read from CLUSTER SLOTS at open, MOVED updates it and sends the command again
 * there, ASK sends ASKING and the command to the slot's importing node once, TRYAGAIN and
 * CLUSTERDOWN are retried with a short sleep until timeout_ms has passed (then the error reply
 * is the answer). A node refuses with those before running anything, so these resends are safe;
 * a command whose connection failed is never sent again (it may have run): the call returns NULL
 * and the next call connects afresh. One thread at a time. */
typedef struct sp_redis sp_redis;

/* Connects (Sentinel: looks the primary up; Cluster: reads the slot map from the first seed that
 * answers and connects to each primary when first needed). NULL with errbuf. */
sp_redis *sp_redis_open(const sp_redis_target *t, int timeout_ms, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
void sp_redis_close(sp_redis *r);

/* 1 for a Redis Cluster. */
int sp_redis_is_cluster(const sp_redis *r);

/* Runs one command on the node that serves key (every key of the command must share key's slot;
 * NULL: a command on no key, run on any primary). argvlen NULL: C strings. Returns the reply
 * (caller frees; it may be an error reply of the command), or NULL with errbuf when the
 * connection failed. */
redisReply *sp_redis_argv(sp_redis *r, const char *key, int argc, const char **argv,
                          const size_t *argvlen, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));
/* The same with a hiredis format ("HGET %s %s"). */
redisReply *sp_redis_command(sp_redis *r, const char *key, char *errbuf, size_t errlen,
                             const char *fmt, ...) __attribute__((warn_unused_result));

/* Several commands in one round trip (per node); replies[i] for cmds[i] (caller frees each). -1
 * with errbuf when a connection failed: every reply is then NULL (freed). */
typedef struct sp_redis_cmd {
    const char *key; /* routes the command, as for sp_redis_argv */
    int argc;
    const char *const *argv;
} sp_redis_cmd;
int sp_redis_pipeline(sp_redis *r, size_t n, const sp_redis_cmd *cmds, redisReply **replies,
                      char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* How many primaries serve the data (1 without a cluster), numbered in the order of their
 * addresses (host, then port: a reshard changes no number); which of them serves key's slot (-1:
 * none known); and one command on the i-th of them, no redirect followed: for what each server
 * holds on its own (INFO, its identity). */
int sp_redis_primaries(sp_redis *r);
int sp_redis_primary_of(sp_redis *r, const char *key);
redisReply *sp_redis_argv_on(sp_redis *r, int i, int argc, const char **argv, char *errbuf,
                             size_t errlen) __attribute__((warn_unused_result));

/* The name of a key of stockpipe's own kept on the i-th primary: base itself without a cluster;
 * in a cluster "base:{N}" on a slot that primary serves (sp_cluster_key_on_node), so each
 * primary holds its own copy and loses it with its data. -1 with errbuf when none fits. */
int sp_redis_key_on(sp_redis *r, int i, const char *base, char *key, size_t cap, char *errbuf,
                    size_t errlen) __attribute__((warn_unused_result));

/* PING every primary; 0 when each answered PONG. */
int sp_redis_ping(sp_redis *r, char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* A Lua script known by its SHA-1 once loaded. Scripts are static objects of the module that
 * runs them; body is embedded at build time from common/lua/NAME.lua. */
typedef struct sp_redis_script {
    const char *name;
    const char *body;
    char sha[41]; /* filled by sp_redis_script_load; empty until then */
} sp_redis_script;

/* One call of a script: its arguments (keys first) and the storage they point into. (An async
 * call copies it: producer/redis_async.h.) */
#define SP_SCRIPT_ARGS_MAX 12
typedef struct sp_script_call {
    sp_redis_script *script;
    int nkeys, argc;
    const char *argv[SP_SCRIPT_ARGS_MAX];
    size_t argvlen[SP_SCRIPT_ARGS_MAX];
    char store[1024];
    size_t used;
    int overflow; /* an argument did not fit: the call is refused when sent */
} sp_script_call;

void sp_script_call_init(sp_script_call *call, sp_redis_script *s, int nkeys);

/* Appends one argument, formatted; keys first (nkeys of them), then ARGV. */
void sp_script_call_arg(sp_script_call *call, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Runs the call on a blocking connection (EVALSHA, loading the script when needed). Returns the
 * reply (caller frees), which may be an error reply of the script; NULL with errbuf when the
 * connection failed. */
redisReply *sp_redis_call(sp_redis *r, sp_script_call *call, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* The most keys + arguments one script call takes (blocking and async alike). */
#define SP_REDIS_SCRIPT_ARGV_MAX 512

/* True for a NOSCRIPT error reply. */
int sp_redis_is_noscript(const redisReply *r);

/* SCRIPT LOAD on every primary; fills s->sha. */
int sp_redis_script_load(sp_redis *r, sp_redis_script *s, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* EVALSHA s with nkeys keys followed by args (argv/argvlen hold keys then args, argc in all), on
 * the node of its first key. Loads the script first if it never was, and sends EVAL with its body
 * on NOSCRIPT (a restarted or failed-over server has an empty script cache). Returns the reply
 * (caller frees with freeReplyObject), which may be a REDIS_REPLY_ERROR from the script itself;
 * NULL with errbuf when the connection failed. */
redisReply *sp_redis_evalsha(sp_redis *r, sp_redis_script *s, int nkeys, int argc,
                             const char **argv, const size_t *argvlen, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
