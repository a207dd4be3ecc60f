/* pg_async.h - PostgreSQL queries from a libevent loop, pipelined on one connection.
 *
 * For a worker whose loop must never block on PostgreSQL (the producer's lookups): connecting is
 * non-blocking (PQconnectPoll), queries are sent in libpq's pipeline mode so many concurrent
 * requests share one connection, and each query's callback runs on the loop in the order the
 * queries were sent. When the server is unreachable, queries fail at once and the connection is
 * retried from sp_pg_async_tick. A DSN may name several hosts (with
 * target_session_attrs=read-write, a primary and its standbys: the connection follows a promotion);
 * each host gets its own bound, and one that never answers does not keep the others from being
 * tried. Everything here belongs to the loop's thread.
 */
#ifndef SP_PG_ASYNC_H
#define SP_PG_ASYNC_H

#include <libpq-fe.h>
#include <stddef.h>

struct event_base;
typedef struct sp_pg_async sp_pg_async;

/* A query's outcome: res holds its rows (PGRES_TUPLES_OK or PGRES_COMMAND_OK) and is freed after
 * the callback returns; on failure res is NULL and err says why. Runs exactly once per query that
 * sp_pg_async_query accepted, including when the connection drops or the client is freed. */
typedef void sp_pg_async_fn(const PGresult *res, const char *err, void *arg);

/* Prepares a client for dsn (connects from the first tick). NULL when out of memory. */
sp_pg_async *sp_pg_async_new(struct event_base *base, const char *dsn, const char *application_name)
    __attribute__((warn_unused_result));

/* Sends one parameterized query (text parameters; copied before returning). 0 when sent: fn will
 * run. -1 when not connected or too many queries wait (fn will not run): the caller answers. */
int sp_pg_async_query(sp_pg_async *pa, const char *sql, int nparams, const char *const *params,
                      sp_pg_async_fn *fn, void *arg) __attribute__((warn_unused_result));

/* 1 when connected and accepting queries. */
int sp_pg_async_ready(const sp_pg_async *pa);

/* Called periodically by the loop: starts a connection attempt when there is none. */
void sp_pg_async_tick(sp_pg_async *pa);

/* Fails every waiting query (callbacks run with res NULL), closes and frees. */
void sp_pg_async_free(sp_pg_async *pa);

#endif
