/* itest.h - small helpers the C integration tests share (include after <cmocka.h>).
 *
 * Header-only: each test program is one file, so the functions are `static inline` (a test that
 * does not use one gets no warning) and the little state they keep (the children to clean up, the
 * last error) is the including program's own. A helper that fails the test does it with
 * fail_msg(); one meant for group teardown reports on stderr instead. The settings of a run (its
 * directory, database, topics...) are passed in, never read from a test's globals. */
#ifndef SP_ITEST_H
#define SP_ITEST_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "kafka.h"
#include "pg_store.h"
#include "redis_cluster.h"
#include "redis_store.h"
#include "stock.h"

/* Where the workers under test are: bin/, or bin/asan/ in a build with AddressSanitizer (the
 * tests run from the repository root). */
#ifdef __SANITIZE_ADDRESS__
#define BIN "bin/asan/"
#else
#define BIN "bin/"
#endif

/* The stack's setting name (from `. var/stack.env`); fails the test when it is unset. */
static inline const char *need_env(const char *name) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') fail_msg("%s is not set: run `. var/stack.env` first", name);
    return v;
}

static inline void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A loopback TCP port nobody listens on right now. */
static inline int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Waits until cond holds, failing with the message (printf-like) after WAIT_S seconds, which the
 * including test defines. */
#define WAIT_FOR(cond, ...)                                                                        \
    do {                                                                                           \
        int64_t deadline_ = sp_clock_mono_ms() + WAIT_S * 1000;                                    \
        while (!(cond) && sp_clock_mono_ms() < deadline_) sleep_ms(100);                           \
        if (!(cond)) fail_msg(__VA_ARGS__);                                                        \
    } while (0)

/* The message of the last helper that failed without failing the test. */
static __attribute__((unused)) char itest_err[1024];

/* ---- child processes ---- */

#define ITEST_MAX_PROCS 16

/* Every child still running, killed by kill_tracked() in teardown. */
static __attribute__((unused)) pid_t itest_pids[ITEST_MAX_PROCS];

static inline void track(pid_t pid) {
    for (int i = 0; i < ITEST_MAX_PROCS; i++)
        if (itest_pids[i] == 0) {
            itest_pids[i] = pid;
            return;
        }
    fail_msg("too many child processes");
}

static inline void untrack(pid_t pid) {
    for (int i = 0; i < ITEST_MAX_PROCS; i++)
        if (itest_pids[i] == pid) itest_pids[i] = 0;
}

/* SIGKILL to every tracked child, reaped; for group teardown. */
static inline void kill_tracked(void) {
    for (int i = 0; i < ITEST_MAX_PROCS; i++)
        if (itest_pids[i] > 0) {
            kill(itest_pids[i], SIGKILL);
            waitpid(itest_pids[i], NULL, 0);
            itest_pids[i] = 0;
        }
}

/* Waits for a tracked process to end: its exit status, 128+signal when killed, -1 on timeout. */
static inline int wait_exit(pid_t pid, int timeout_s) {
    int status;
    for (int64_t deadline = sp_clock_mono_ms() + timeout_s * 1000; sp_clock_mono_ms() < deadline;
         sleep_ms(20)) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            untrack(pid);
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
    }
    return -1;
}

/* Runs argv to completion with extra NAME=VALUE settings (NULL-terminated, may be NULL). Its
 * stderr is appended to the file log (inherited when log is NULL); its stdout goes into out
 * (NUL-terminated) when out is not NULL, else into log, else nowhere. Its exit status or -1. */
static inline int run(char *const argv[], const char *const *settings, const char *log, char *out,
                      size_t cap) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        for (int i = 0; settings && settings[i]; i++) putenv((char *)settings[i]);
        int fd = log ? open(log, O_WRONLY | O_CREAT | O_APPEND, 0644) : -1;
        dup2(out || fd < 0 ? fds[1] : fd, 1);
        if (fd >= 0) dup2(fd, 2);
        close(fds[0]);
        close(fds[1]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    size_t len = 0;
    char sink[512];
    for (ssize_t r;;) {
        char *dst = out && len + 1 < cap ? out + len : sink;
        size_t room = out && len + 1 < cap ? cap - len - 1 : sizeof(sink);
        if ((r = read(fds[0], dst, room)) <= 0) break;
        if (dst != sink) len += (size_t)r;
    }
    if (out) out[len] = '\0';
    close(fds[0]);
    int status;
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* ---- the run ---- */

/* Sets up what one run of the test program `name` owns, so that runs side by side never meet:
 * tag, unique per pid and time (for its databases, topics, consumer groups); *sku_base, SKUs of
 * its own (sku_origin + pid % 100000 * 1000 + seconds % 10 * 100: each program picks an origin far
 * from the others'); tmp, the directory /tmp/stockpipe-test-NAME-TAG for logs and Redis's files,
 * created here. Then checks that the stack's settings in env (NULL-terminated) are set. For group
 * setup: 0, or -1 with the reason on stderr. */
static inline int begin_run(const char *name, int64_t sku_origin, const char *const *env, char *tag,
                            size_t tagcap, int64_t *sku_base, char *tmp, size_t tmpcap) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(tag, tagcap, "%d_%lld", (int)getpid(), (long long)(ts.tv_sec % 1000000));
    *sku_base = sku_origin + (int64_t)(getpid() % 100000) * 1000 + ts.tv_sec % 10 * 100;
    snprintf(tmp, tmpcap, "/tmp/stockpipe-test-%s-%s", name, tag);
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "cannot create %s: %s\n", tmp, strerror(errno));
        return -1;
    }
    int missing = 0;
    for (int i = 0; env[i]; i++) missing |= getenv(env[i]) == NULL;
    if (missing) {
        for (int i = 0; env[i]; i++) fprintf(stderr, "%s%s", i ? ", " : "", env[i]);
        fprintf(stderr, " are not set: run `. var/stack.env`\n");
        return -1;
    }
    return 0;
}

/* For group teardown: removes the run's directory tmp when clean (unless TEST_KEEP_LOGS is set),
 * else says where the logs of `whose` ("workers'") are, for a look at what went wrong. */
static inline void end_run(char *tmp, int clean, const char *whose) {
    if (clean && getenv("TEST_KEEP_LOGS") == NULL) {
        char *argv[] = {(char[]){"/bin/rm"}, (char[]){"-rf"}, tmp, NULL};
        (void)run(argv, NULL, "/dev/null", NULL, 0);
    } else {
        fprintf(stderr, "the %s logs are in %s\n", whose, tmp);
    }
}

/* Whether a line of the file at path contains needle (0 when it cannot be read). */
static inline int log_has(const char *path, const char *needle) {
    FILE *f = fopen(path, "r");
    char line[4096];
    int found = 0;
    if (f == NULL) return 0;
    while (!found && fgets(line, sizeof(line), f)) found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* ---- PostgreSQL ---- */

/* A connection named after the test program; fails the test when there is none. */
static inline PGconn *connect_pg(const char *dsn) {
    PGconn *pg = sp_pg_connect(dsn, program_invocation_short_name, itest_err, sizeof(itest_err));
    if (pg == NULL) fail_msg("%s", itest_err);
    return pg;
}

/* The first value a query returns as an integer; -1 when there is no row or it is NULL. */
static inline int64_t query_int(const char *dsn, const char *sql, int n,
                                const char *const *params) {
    PGconn *pg = connect_pg(dsn);
    PGresult *res = sp_pg_query(pg, sql, n, params, itest_err, sizeof(itest_err));
    if (res == NULL) fail_msg("%s: %s", sql, itest_err);
    int64_t v = PQntuples(res) == 0 || PQgetisnull(res, 0, 0)
                    ? -1
                    : strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    PQfinish(pg);
    return v;
}

/* The rows of a query as text: fields joined by '|', NULL as "-", one line per row; *nrows (when
 * not NULL) gets the row count. The caller frees. Compared byte for byte between databases. */
static inline char *dump(const char *dsn, const char *sql, int n, const char *const *params,
                         int *nrows) {
    PGconn *pg = connect_pg(dsn);
    PGresult *res = sp_pg_query(pg, sql, n, params, itest_err, sizeof(itest_err));
    if (res == NULL) fail_msg("%s: %s", sql, itest_err);
    size_t cap = 1024, len = 0;
    for (int r = 0; r < PQntuples(res); r++)
        for (int f = 0; f < PQnfields(res); f++) cap += (size_t)PQgetlength(res, r, f) + 2;
    char *out = malloc(cap);
    assert_non_null(out);
    out[0] = '\0';
    for (int r = 0; r < PQntuples(res); r++) {
        for (int f = 0; f < PQnfields(res); f++)
            len += (size_t)snprintf(out + len, cap - len, "%s%s", f ? "|" : "",
                                    PQgetisnull(res, r, f) ? "-" : PQgetvalue(res, r, f));
        len += (size_t)snprintf(out + len, cap - len, "\n");
    }
    if (nrows) *nrows = PQntuples(res);
    PQclear(res);
    PQfinish(pg);
    return out;
}

/* Creates database db on the stack's server (PG_DSN) and migrates it with scripts/migrate.sh
 * (its output appended to log; see run()); its conninfo into dsn. Fails the test on error. */
static inline void create_database(const char *db, char *dsn, size_t cap, const char *log) {
    PGconn *pg = connect_pg(need_env("PG_DSN"));
    char *ident = PQescapeIdentifier(pg, db, strlen(db));
    char sql[256];
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", ident);
    PQfreemem(ident);
    if (sp_pg_exec(pg, sql, 0, NULL, itest_err, sizeof(itest_err)) != 0) {
        PQfinish(pg);
        fail_msg("%s: %s", sql, itest_err);
    }
    PQfinish(pg);
    /* In a conninfo string the last dbname wins. */
    snprintf(dsn, cap, "%s dbname=%s", need_env("PG_DSN"), db);
    char *argv[] = {(char[]){"scripts/migrate.sh"}, (char[]){"--dsn"}, dsn, NULL};
    assert_int_equal(run(argv, NULL, log, NULL, 0), 0);
}

/* DROP DATABASE IF EXISTS db WITH (FORCE) on the stack's server; 0, or -1 with the error on
 * stderr (for teardown, where it must not fail the test). */
static inline int drop_database(const char *db) {
    PGconn *pg = sp_pg_connect(getenv("PG_DSN"), program_invocation_short_name, itest_err,
                               sizeof(itest_err));
    if (pg == NULL) {
        fprintf(stderr, "%s\n", itest_err);
        return -1;
    }
    char *ident = PQescapeIdentifier(pg, db, strlen(db));
    char sql[256];
    snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)", ident);
    PQfreemem(ident);
    int rc = sp_pg_exec(pg, sql, 0, NULL, itest_err, sizeof(itest_err));
    if (rc != 0) fprintf(stderr, "%s: %s\n", sql, itest_err);
    PQfinish(pg);
    return rc == 0 ? 0 : -1;
}

/* ---- Redis: a private server ---- */

/* Starts a redis-server on 127.0.0.1:port with no persistence at all (a restart comes back
 * empty, like a replica that lost it all), its files and log (redis.log) in dir, and waits until
 * it answers PING. Its pid, tracked. */
static inline pid_t start_redis(int port, const char *dir) {
    char portstr[16], log[256], url[64];
    snprintf(portstr, sizeof(portstr), "%d", port);
    snprintf(log, sizeof(log), "%s/redis.log", dir);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execlp("redis-server", "redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save",
               "", "--appendonly", "no", "--dir", dir, (char *)NULL);
        _exit(127);
    }
    track(pid);
    sp_redis_target target;
    if (sp_redis_parse_url(url, &target, itest_err, sizeof(itest_err)) != 0)
        fail_msg("%s", itest_err);
    for (int64_t deadline = sp_clock_mono_ms() + 20000; sp_clock_mono_ms() < deadline;
         sleep_ms(50)) {
        sp_redis *c = sp_redis_open(&target, 500, itest_err, sizeof(itest_err));
        if (c) {
            int ok = sp_redis_ping(c, itest_err, sizeof(itest_err)) == 0;
            sp_redis_close(c);
            if (ok) return pid;
        }
    }
    fail_msg("redis-server on port %d did not answer: %s", port, itest_err);
    return -1;
}

/* ---- Redis: a private cluster ---- */

#define ITEST_CLUSTER_MAX 6

/* A private Redis Cluster of primaries only, no persistence (a node restarted empty lost all). */
typedef struct itest_cluster {
    int n;
    int port[ITEST_CLUSTER_MAX];
    pid_t pid[ITEST_CLUSTER_MAX];
    char dir[ITEST_CLUSTER_MAX][320];
    char url[256]; /* redis-cluster://127.0.0.1:P1,... */
} itest_cluster;

/* A loopback port in 20000..21999 (clear of the 22xxx ports of tests/e2e/redis_cluster_suites.sh)
 * whose cluster bus port (+10000) is free too (both below the ephemeral range), not among taken. */
static inline int cluster_free_port(const int *taken, int ntaken) {
    for (unsigned tries = 0; tries < 500; tries++) {
        int p = 20000 + (int)(((unsigned)getpid() * 7919u + tries * 104729u) % 2000u), ok = 1;
        for (int i = 0; i < ntaken; i++) ok &= taken[i] != p;
        for (int k = 0; k < 2 && ok; k++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = {.sin_family = AF_INET,
                                    .sin_port = htons((uint16_t)(p + k * 10000)),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
            if (fd >= 0) close(fd);
        }
        if (ok) return p;
    }
    fail_msg("no free pair of ports for a cluster node");
    return -1;
}

/* A command on node i of the cluster, on a connection of its own; the reply (caller frees). */
static inline redisReply *cluster_node_cmd(const itest_cluster *cl, int i, const char *fmt, ...) {
    va_list ap;
    redisContext *c = redisConnect("127.0.0.1", cl->port[i]);
    if (c == NULL || c->err) fail_msg("node %d: %s", i, c ? c->errstr : "out of memory");
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL) fail_msg("node %d: %s", i, c->errstr);
    redisFree(c);
    return r;
}

static inline int cluster_node_state_ok(const itest_cluster *cl, int i) {
    redisContext *c = redisConnect("127.0.0.1", cl->port[i]);
    redisReply *r = c && !c->err ? redisCommand(c, "CLUSTER INFO") : NULL;
    int ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok") != NULL;
    if (r) freeReplyObject(r);
    if (c) redisFree(c);
    return ok;
}

/* Starts node i (an empty directory: a new node), tracked; waits until it answers. */
static inline void cluster_node_start(itest_cluster *cl, int i) {
    char portstr[16], log[300];
    snprintf(portstr, sizeof(portstr), "%d", cl->port[i]);
    snprintf(log, sizeof(log), "%s/redis.log", cl->dir[i]);
    mkdir(cl->dir[i], 0755);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
        execlp("redis-server", "redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save",
               "", "--appendonly", "no", "--dir", cl->dir[i], "--cluster-enabled", "yes",
               "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "3000",
               (char *)NULL);
        _exit(127);
    }
    track(pid);
    cl->pid[i] = pid;
    for (int64_t deadline = sp_clock_mono_ms() + 10000;; sleep_ms(50)) {
        redisContext *c = redisConnect("127.0.0.1", cl->port[i]);
        int up = c && !c->err;
        if (c) redisFree(c);
        if (up) return;
        if (sp_clock_mono_ms() > deadline) fail_msg("cluster node %d did not start (%s)", i, log);
    }
}

/* n primaries in dir/node-I (redis-cli --cluster create, no replicas); waits for
 * cluster_state:ok on each. */
static inline void start_redis_cluster(itest_cluster *cl, int n, const char *dir) {
    assert_true(strlen(dir) < 256);
    char addr[ITEST_CLUSTER_MAX][32], log[300];
    char *argv[ITEST_CLUSTER_MAX + 5];
    int argc = 0;
    char base[256]; /* dir may live in the same object as cl */
    assert_true(n >= 1 && n <= ITEST_CLUSTER_MAX);
    snprintf(base, sizeof(base), "%s", dir);
    memset(cl, 0, sizeof(*cl));
    cl->n = n;
    argv[argc++] = (char[]){"/usr/bin/redis-cli"};
    argv[argc++] = (char[]){"--cluster"};
    argv[argc++] = (char[]){"create"};
    for (int i = 0; i < n; i++) {
        cl->port[i] = cluster_free_port(cl->port, i);
        snprintf(cl->dir[i], sizeof(cl->dir[i]), "%s/node-%d", base, i);
        cluster_node_start(cl, i);
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", cl->port[i]);
        argv[argc++] = addr[i];
    }
    argv[argc++] = (char[]){"--cluster-yes"};
    argv[argc] = NULL;
    snprintf(log, sizeof(log), "%s/cluster-create.log", base);
    assert_int_equal(run(argv, NULL, log, NULL, 0), 0);
    for (int i = 0; i < n; i++) {
        int64_t deadline = sp_clock_mono_ms() + 30000;
        while (!cluster_node_state_ok(cl, i) && sp_clock_mono_ms() < deadline) sleep_ms(100);
        if (!cluster_node_state_ok(cl, i)) fail_msg("cluster node %d never ok (%s)", i, log);
    }
    size_t len = (size_t)snprintf(cl->url, sizeof(cl->url), "redis-cluster://");
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(cl->url + len, sizeof(cl->url) - len, "%s127.0.0.1:%d",
                                i ? "," : "", cl->port[i]);
}

/* kill -9 of node i and a restart with nothing (no data, no nodes.conf): the others forget its
 * old id (its slots unserved), between(arg) runs if given, then they meet the new node, which
 * takes over the old one's slots. A primary that lost all it had, while the other primaries kept
 * theirs. */
static inline void cluster_node_restart_empty(itest_cluster *cl, int i, void (*between)(void *),
                                              void *arg) {
    char old_id[64], path[340];
    redisReply *r = cluster_node_cmd(cl, i, "CLUSTER MYID");
    snprintf(old_id, sizeof(old_id), "%s", r->str);
    freeReplyObject(r);
    /* its slot ranges, as the cluster sees them */
    int from[64], to[64], nranges = 0;
    r = cluster_node_cmd(cl, (i + 1) % cl->n, "CLUSTER SLOTS");
    for (size_t k = 0; k < r->elements && nranges < 64; k++) {
        redisReply *range = r->element[k];
        if (range->element[2]->element[1]->integer == cl->port[i])
            from[nranges] = (int)range->element[0]->integer,
            to[nranges++] = (int)range->element[1]->integer;
    }
    freeReplyObject(r);
    assert_int_equal(kill(cl->pid[i], SIGKILL), 0);
    assert_int_equal(wait_exit(cl->pid[i], 30), 128 + SIGKILL);
    for (int k = 0; k < cl->n; k++)
        if (k != i) freeReplyObject(cluster_node_cmd(cl, k, "CLUSTER FORGET %s", old_id));
    if (between) between(arg);
    snprintf(path, sizeof(path), "%s/nodes.conf", cl->dir[i]);
    unlink(path);
    cluster_node_start(cl, i);
    for (int k = 0; k < cl->n; k++)
        if (k != i)
            freeReplyObject(cluster_node_cmd(cl, k, "CLUSTER MEET 127.0.0.1 %d", cl->port[i]));
    for (int k = 0; k < nranges; k++) {
        r = cluster_node_cmd(cl, i, "CLUSTER ADDSLOTSRANGE %d %d", from[k], to[k]);
        if (r->type == REDIS_REPLY_ERROR) fail_msg("ADDSLOTSRANGE: %s", r->str);
        freeReplyObject(r);
    }
    for (int k = 0; k < cl->n; k++) {
        int64_t deadline = sp_clock_mono_ms() + 30000;
        while (!cluster_node_state_ok(cl, k) && sp_clock_mono_ms() < deadline) sleep_ms(100);
        if (!cluster_node_state_ok(cl, k)) fail_msg("node %d not ok after node %d's restart", k, i);
    }
}

/* The index of the node serving key's slot, asked of node 0 (-1: none). */
static inline int cluster_owner(const itest_cluster *cl, const char *key) {
    unsigned slot = sp_cluster_key_slot(key, strlen(key));
    redisReply *r = cluster_node_cmd(cl, 0, "CLUSTER SLOTS");
    int who = -1;
    for (size_t k = 0; k < r->elements; k++) {
        redisReply *range = r->element[k];
        if ((long long)slot < range->element[0]->integer ||
            (long long)slot > range->element[1]->integer)
            continue;
        for (int n = 0; n < cl->n; n++)
            if (range->element[2]->element[1]->integer == cl->port[n]) who = n;
    }
    freeReplyObject(r);
    return who;
}

/* ---- the stack's Redis ---- */

/* A blocking connection to the stack's Redis (REDIS_URL), or NULL with the reason on stderr. */
static inline sp_redis *redis_connect_env(void) {
    sp_redis_target target;
    const char *url = getenv("REDIS_URL");
    if (url == NULL || sp_redis_parse_url(url, &target, itest_err, sizeof(itest_err)) != 0) {
        fprintf(stderr, "REDIS_URL: %s\n", url ? itest_err : "not set");
        return NULL;
    }
    sp_redis *c = sp_redis_open(&target, 2000, itest_err, sizeof(itest_err));
    if (c == NULL) fprintf(stderr, "redis: %s\n", itest_err);
    return c;
}

/* For teardown: deletes the sale keys of SKUs first..first+n-1 on the stack's Redis. */
static inline void forget_skus(int64_t first, int n) {
    sp_redis *rc = redis_connect_env();
    if (rc == NULL) return;
    const char *suffixes[] = {"sale", "opening", "users", "resv", "returned", "restocks"};
    char key[SP_STOCK_KEY_MAX];
    for (int s = 0; s < n; s++)
        for (size_t i = 0; i < sizeof(suffixes) / sizeof(suffixes[0]); i++) {
            sp_stock_key(key, first + s, suffixes[i]);
            freeReplyObject(sp_redis_command(rc, key, itest_err, sizeof(itest_err), "DEL %s", key));
        }
    sp_redis_close(rc);
}

/* The "order_id" of a JSON answer into id (cap bytes); fails the test when there is none. */
static inline void json_order_id(const char *resp, char *id, size_t cap) {
    const char *p = strstr(resp, "\"order_id\":\"");
    if (p == NULL) fail_msg("no order_id in %s", resp);
    p += strlen("\"order_id\":\"");
    size_t n = strcspn(p, "\"");
    if (n >= cap) fail_msg("order_id too long in %s", resp);
    memcpy(id, p, n);
    id[n] = '\0';
}

/* ---- the sale's hashes in Redis ---- */

/* The reply to HGET {sku:N}:suffix field on c; fails the test when Redis does not answer. */
static inline redisReply *sale_hget(sp_redis *c, int64_t sku, const char *suffix,
                                    const char *field) {
    char key[SP_STOCK_KEY_MAX];
    sp_stock_key(key, sku, suffix);
    redisReply *r = sp_redis_command(c, key, itest_err, sizeof(itest_err), "HGET %s %s", key,
                                     field);
    if (r == NULL) fail_msg("HGET %s %s: %s", key, field, itest_err);
    return r;
}

/* The field of the sale's hash as an integer; -1 when the field is absent. */
static inline int64_t sale_hget_int(sp_redis *c, int64_t sku, const char *suffix,
                                    const char *field) {
    redisReply *r = sale_hget(c, sku, suffix, field);
    int64_t v = r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

/* The field of the sale's hash as text, "(nil)" when absent; in a static buffer that the next
 * call overwrites. */
static inline const char *sale_hget_str(sp_redis *c, int64_t sku, const char *suffix,
                                        const char *field) {
    static char v[256];
    redisReply *r = sale_hget(c, sku, suffix, field);
    snprintf(v, sizeof(v), "%s", r->type == REDIS_REPLY_STRING ? r->str : "(nil)");
    freeReplyObject(r);
    return v;
}

/* ---- HTTP ---- */

/* One request to 127.0.0.1:port, with an Authorization: Bearer token and an Idempotency-Key
 * when not NULL; the status code (0 when the server could not be reached) and the whole answer,
 * headers included, in buf. */
static inline int http_raw(int port, const char *method, const char *path, const char *token,
                           const char *idem, const char *body, char *buf, size_t cap) {
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char req[2048], hdr[512] = "";
    size_t len = 0;
    buf[0] = '\0';
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    struct timeval tv = {15, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return 0;
    }
    if (token) snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s\r\n", token);
    if (idem)
        snprintf(hdr + strlen(hdr), sizeof(hdr) - strlen(hdr), "Idempotency-Key: %s\r\n", idem);
    int n = snprintf(req, sizeof(req),
                     "%s %s HTTP/1.0\r\nHost: 127.0.0.1\r\n%sContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     method, path, hdr, body ? strlen(body) : 0, body ? body : "");
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return 0;
    }
    for (ssize_t r; len + 1 < cap && (r = read(fd, buf + len, cap - len - 1)) > 0;)
        len += (size_t)r;
    buf[len] = '\0';
    close(fd);
    int code = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", &code) != 1) code = 0;
    return code;
}

/* The same with the body alone in buf. */
static inline int http(int port, const char *method, const char *path, const char *token,
                       const char *idem, const char *body, char *buf, size_t cap) {
    int code = http_raw(port, method, path, token, idem, body, buf, cap);
    char *b = strstr(buf, "\r\n\r\n");
    if (b)
        memmove(buf, b + 4, strlen(b + 4) + 1);
    else
        buf[0] = '\0';
    return code;
}

/* A series' value from the /metrics of 127.0.0.1:port ("name" or "name{labels}"); -1 when it is
 * absent or the server does not answer. */
static inline int64_t metric(int port, const char *series) {
    static char body[256 * 1024];
    if (http(port, "GET", "/metrics", NULL, NULL, NULL, body, sizeof(body)) != 200) return -1;
    size_t n = strlen(series);
    for (char *line = body; line && *line; line = strchr(line, '\n'), line = line ? line + 1 : NULL)
        if (strncmp(line, series, n) == 0 && line[n] == ' ') return strtoll(line + n + 1, NULL, 10);
    return -1;
}

/* ---- worker processes ---- */

typedef struct proc {
    pid_t pid;
    int port;      /* its HTTP_PORT */
    char log[256]; /* its stdout and stderr */
    char name[32];
} proc;

/* Where a run's workers find the stack; start() hands it to them as their settings. */
typedef struct itest_stack {
    const char *dir; /* the run's directory: each worker logs to dir/<name>.log */
    const char *tag; /* unique per run: in each WORKER_ID */
    const char *dsn, *redis_url, *topic, *dlq, *group;
} itest_stack;

/* Starts `bin [arg]` as worker name on stack s, on a free port, with extra NAME=VALUE settings
 * (NULL-terminated, may be NULL); tracked. */
static inline proc start(const itest_stack *s, const char *bin, const char *name,
                         const char *const *settings, const char *arg) {
    proc p = {.port = free_port()};
    snprintf(p.name, sizeof(p.name), "%s", name);
    snprintf(p.log, sizeof(p.log), "%s/%s.log", s->dir, name);
    p.pid = fork();
    assert_true(p.pid >= 0);
    if (p.pid == 0) {
        char port[16], id[64];
        snprintf(port, sizeof(port), "%d", p.port);
        snprintf(id, sizeof(id), "test-%s-%s", name, s->tag);
        setenv("PG_DSN", s->dsn, 1);
        setenv("REDIS_URL", s->redis_url, 1);
        setenv("KAFKA_TOPIC", s->topic, 1);
        setenv("KAFKA_DLQ_TOPIC", s->dlq, 1);
        setenv("KAFKA_GROUP", s->group, 1);
        setenv("HTTP_ADDR", "127.0.0.1", 1);
        setenv("HTTP_PORT", port, 1);
        setenv("WORKER_ID", id, 1);
        const char *level = getenv("ITEST_LOG_LEVEL"); /* debug, to see more of a failure */
        setenv("LOG_LEVEL", level ? level : "info", 1);
        for (int i = 0; settings && settings[i]; i++) putenv((char *)settings[i]);
        int fd = open(p.log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execl(bin, bin, arg, (char *)NULL);
        _exit(127);
    }
    track(p.pid);
    return p;
}

/* Waits up to timeout_s until the process answers /readyz with 200; fails when it dies. */
static inline void wait_ready(const proc *p, int timeout_s) {
    char body[1024];
    for (int64_t deadline = sp_clock_mono_ms() + timeout_s * 1000; sp_clock_mono_ms() < deadline;
         sleep_ms(100)) {
        if (http(p->port, "GET", "/readyz", NULL, NULL, NULL, body, sizeof(body)) == 200) return;
        if (waitpid(p->pid, NULL, WNOHANG) == p->pid) fail_msg("%s died (log %s)", p->name, p->log);
    }
    fail_msg("%s never became ready (log %s)", p->name, p->log);
}

/* Waits until a reaper started on a new database has finished its first reconcile of every SKU
 * (nothing is recorded about Redis in such a database): a sale opened during its settle wait is
 * paused and rebuilt on its own meanwhile, answering orders 503 recovering. */
static inline void wait_reconciled(const proc *p, int timeout_s) {
    for (int64_t deadline = sp_clock_mono_ms() + timeout_s * 1000; sp_clock_mono_ms() < deadline;
         sleep_ms(100)) {
        if (metric(p->port, "stockpipe_reaper_recovery_seconds") > 0) return;
        if (waitpid(p->pid, NULL, WNOHANG) == p->pid) fail_msg("%s died (log %s)", p->name, p->log);
    }
    fail_msg("%s never finished its first reconcile (log %s)", p->name, p->log);
}

/* SIGTERM; the worker must drain and exit 0 within 60 s. */
static inline void stop(proc *p) {
    if (p->pid <= 0) return;
    assert_int_equal(kill(p->pid, SIGTERM), 0);
    int rc = wait_exit(p->pid, 60);
    if (rc != 0) fail_msg("%s exited %d after SIGTERM (log %s)", p->name, rc, p->log);
    p->pid = 0;
}

/* stop() for group teardown: each running process of all[0..n) gets SIGTERM and 60 s to exit 0,
 * failures reported on stderr. 1 when all exited 0. */
static inline int stop_all(proc *const *all, size_t n) {
    int clean = 1;
    for (size_t i = 0; i < n; i++) {
        if (all[i]->pid <= 0) continue;
        kill(all[i]->pid, SIGTERM);
        int rc = wait_exit(all[i]->pid, 60);
        if (rc != 0) {
            fprintf(stderr, "%s exited %d after SIGTERM (log %s)\n", all[i]->name, rc, all[i]->log);
            clean = 0;
        }
        all[i]->pid = 0;
    }
    return clean;
}

/* ---- Kafka ---- */

/* A short-lived Kafka client (producer and admin) of KAFKA_BROKERS, or NULL with the message in
 * errbuf. */
static inline rd_kafka_t *kafka_client(char *errbuf, size_t errlen) {
    rd_kafka_conf_t *conf = sp_kafka_conf_new(getenv("KAFKA_BROKERS"),
                                              program_invocation_short_name, NULL, errbuf, errlen);
    if (conf == NULL) return NULL;
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errbuf, errlen);
    if (rk == NULL) rd_kafka_conf_destroy(conf);
    return rk;
}

/* Runs fn with a short-lived Kafka client (kafka_client()); fn's result, or -1 with the message
 * in errbuf when there is no client. */
static inline int with_kafka(int (*fn)(rd_kafka_t *), char *errbuf, size_t errlen) {
    rd_kafka_t *rk = kafka_client(errbuf, errlen);
    if (rk == NULL) return -1;
    int rc = fn(rk);
    rd_kafka_destroy(rk);
    return rc;
}

/* Creates topic and waits until each of its partitions has a leader, so that producing and
 * consuming do not race its creation; 0, or -1 with the message in errbuf. */
static inline int make_topic(rd_kafka_t *rk, const char *topic, int partitions, char *errbuf,
                             size_t errlen) {
    if (sp_kafka_topic_create(rk, topic, partitions, 30000, errbuf, errlen) != 0) return -1;
    int n = 0;
    for (int64_t deadline = sp_clock_mono_ms() + 30000; sp_clock_mono_ms() < deadline;
         sleep_ms(200))
        if (sp_kafka_topic_partitions(rk, topic, 2000, &n, errbuf, errlen) == 0 && n == partitions)
            return 0;
    snprintf(errbuf, errlen, "topic %s never got %d partitions with leaders", topic, partitions);
    return -1;
}

/* Names the topics and consumer group of a run of the test program `name` (tag from begin_run):
 * topic "stockpipe.test.NAME.TAG", dlq the same with ".dlq", group "test-NAME-TAG"; each buffer
 * holds cap bytes. */
static inline void name_topics(const char *name, const char *tag, char *topic, char *dlq,
                               char *group, size_t cap) {
    snprintf(topic, cap, "stockpipe.test.%s.%s", name, tag);
    snprintf(dlq, cap, "stockpipe.test.%s.%s.dlq", name, tag);
    snprintf(group, cap, "test-%s-%s", name, tag);
}

/* The events in topic's first `partitions` partitions: the sum of their end offsets (every offset
 * is an event where no transaction wrote). Fails the test when Kafka does not answer. */
static inline int64_t topic_end(const char *topic, int partitions) {
    rd_kafka_t *rk = kafka_client(itest_err, sizeof(itest_err));
    if (rk == NULL) fail_msg("kafka: %s", itest_err);
    int64_t sum = 0;
    for (int p = 0; p < partitions; p++) {
        int64_t lo = 0, hi = 0;
        rd_kafka_resp_err_t e = rd_kafka_query_watermark_offsets(rk, topic, p, &lo, &hi, 10000);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) {
            rd_kafka_destroy(rk);
            fail_msg("end offsets of %s [%d]: %s", topic, p, rd_kafka_err2str(e));
        }
        sum += hi;
    }
    rd_kafka_destroy(rk);
    return sum;
}

/* Deletes the records of topic's partition below offset `before` (DeleteRecords, as retention
 * would); fails the test when Kafka refuses. */
static inline void delete_records_before(const char *topic, int32_t partition, int64_t before) {
    rd_kafka_t *rk = kafka_client(itest_err, sizeof(itest_err));
    if (rk == NULL) fail_msg("kafka: %s", itest_err);
    rd_kafka_topic_partition_list_t *offsets = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(offsets, topic, partition)->offset = before;
    rd_kafka_DeleteRecords_t *del = rd_kafka_DeleteRecords_new(offsets);
    rd_kafka_topic_partition_list_destroy(offsets);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_DeleteRecords(rk, &del, 1, NULL, q);
    rd_kafka_DeleteRecords_destroy(del);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60000);
    const char *err = ev == NULL ? "no answer" : rd_kafka_event_error_string(ev);
    int failed = ev == NULL || rd_kafka_event_error(ev) != RD_KAFKA_RESP_ERR_NO_ERROR;
    if (!failed) {
        const rd_kafka_topic_partition_list_t *res = rd_kafka_DeleteRecords_result_offsets(
            rd_kafka_event_DeleteRecords_result(ev));
        failed = res == NULL || res->cnt != 1 || res->elems[0].err != RD_KAFKA_RESP_ERR_NO_ERROR;
        if (failed) err = res && res->cnt == 1 ? rd_kafka_err2str(res->elems[0].err) : "no result";
    }
    if (failed) snprintf(itest_err, sizeof(itest_err), "%s", err);
    if (ev) rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
    if (failed)
        fail_msg("delete records of %s [%d] below %lld: %s", topic, (int)partition,
                 (long long)before, itest_err);
}

/* For group setup: creates the run's topic s->topic with `partitions` partitions and its
 * dead-letter topic s->dlq with one (make_topic); 0, or -1 with the reason on stderr. */
static inline int create_run_topics(const itest_stack *s, int partitions) {
    rd_kafka_t *rk = kafka_client(itest_err, sizeof(itest_err));
    int rc = rk && make_topic(rk, s->topic, partitions, itest_err, sizeof(itest_err)) == 0 &&
                     make_topic(rk, s->dlq, 1, itest_err, sizeof(itest_err)) == 0
                 ? 0
                 : -1;
    if (rk) rd_kafka_destroy(rk);
    if (rc != 0) fprintf(stderr, "topics: %s\n", itest_err);
    return rc;
}

/* For group teardown: deletes s->topic and s->dlq, failures reported on stderr (nothing is said
 * when there is no Kafka client). */
static inline void delete_run_topics(const itest_stack *s) {
    rd_kafka_t *rk = kafka_client(itest_err, sizeof(itest_err));
    if (rk == NULL) return;
    const char *topics[] = {s->topic, s->dlq};
    for (int i = 0; i < 2; i++)
        if (sp_kafka_topic_delete(rk, topics[i], 30000, itest_err, sizeof(itest_err)) != 0)
            fprintf(stderr, "%s\n", itest_err);
    rd_kafka_destroy(rk);
}

/* Where a produced message landed, from its delivery report. */
typedef struct delivery {
    int done;
    rd_kafka_resp_err_t err;
    int32_t partition;
    int64_t offset;
} delivery;

/* The delivery report callback (rd_kafka_conf_set_dr_msg_cb): fills the delivery passed as the
 * message's opaque, if any. */
static inline void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk, (void)opaque;
    delivery *d = m->_private;
    if (d == NULL) return;
    d->done = 1;
    d->err = m->err;
    d->partition = m->partition;
    d->offset = m->offset;
}

#endif
