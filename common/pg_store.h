/* pg_store.h - PostgreSQL connections and parameterized statements (libpq). */
#ifndef SP_PG_STORE_H
#define SP_PG_STORE_H

#include <libpq-fe.h>
#include <stddef.h>

/* Connects with the libpq conninfo dsn, tagging the session with application_name (visible in
 * pg_stat_activity). Returns a connection the caller owns (PQfinish), or NULL with the server's
 * reason in errbuf. */
PGconn *sp_pg_connect(const char *dsn, const char *application_name, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* sp_pg_connect, giving up after timeout_s seconds (libpq's connect_timeout, per address tried)
 * unless dsn sets its own connect_timeout, which wins: without one a server that does not answer
 * (down, cut off) holds the caller for as long as TCP retries, minutes. */
PGconn *sp_pg_connect_timeout(const char *dsn, const char *application_name, int timeout_s,
                              char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Runs one parameterized statement (text parameters, NULL for SQL NULL) that returns no rows, or
 * whose rows are not wanted. 0 on success; -1 with errbuf. */
int sp_pg_exec(PGconn *pg, const char *sql, int nparams, const char *const *params, char *errbuf,
               size_t errlen) __attribute__((warn_unused_result));

/* Runs one parameterized query; returns its rows (caller PQclears) or NULL with errbuf. */
PGresult *sp_pg_query(PGconn *pg, const char *sql, int nparams, const char *const *params,
                      char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* SELECT 1; 0 when the server answered. */
int sp_pg_ping(PGconn *pg, char *errbuf, size_t errlen) __attribute__((warn_unused_result));

#endif
