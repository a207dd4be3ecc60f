/* redis_store.h - Redis connections (single server or via Sentinel) and Lua scripts by EVALSHA. */
#ifndef SP_REDIS_STORE_H
#define SP_REDIS_STORE_H

#include <hiredis/hiredis.h>
#include <stddef.h>

#define SP_REDIS_HOSTS_MAX 8

/* Where Redis is, parsed from REDIS_URL:
 *   redis://[:password@]host[:port][/db]
 *   sentinel://[:password@]host:port[,host:port...]/master_name[/db]
 * With Sentinel the hosts are Sentinels and the primary is looked up on every connect. */
typedef struct sp_redis_target {
    int sentinel;
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

/* Connects to the server (Sentinel: asks each Sentinel in turn for the primary and checks that it
 * says it is one), authenticates, selects the db and sets timeout_ms on connect and on every
 * command. Returns a context the caller owns (redisFree), or NULL with the reason in errbuf. */
redisContext *sp_redis_connect(const sp_redis_target *t, int timeout_ms, char *errbuf,
                               size_t errlen) __attribute__((warn_unused_result));

/* PING; 0 when the server answered PONG. */
int sp_redis_ping(redisContext *c, char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* A Lua script known by its SHA-1 once loaded. Scripts are static objects of the module that
 * runs them; body is embedded at build time from common/lua/NAME.lua. */
typedef struct sp_redis_script {
    const char *name;
    const char *body;
    char sha[41]; /* filled by sp_redis_script_load; empty until then */
} sp_redis_script;

/* SCRIPT LOAD; fills s->sha. */
int sp_redis_script_load(redisContext *c, sp_redis_script *s, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* EVALSHA s with nkeys keys followed by args (argv/argvlen hold keys then args, argc in all).
 * Loads the script first if it never was, and once more on NOSCRIPT (a restarted or failed-over
 * server has an empty script cache). Returns the reply (caller frees with freeReplyObject), which
 * may be a REDIS_REPLY_ERROR from the script itself; NULL with errbuf when the connection failed
 * (the context is then unusable: reconnect). */
redisReply *sp_redis_evalsha(redisContext *c, sp_redis_script *s, int nkeys, int argc,
                             const char **argv, const size_t *argvlen, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

#endif
