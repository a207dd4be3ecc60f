/* pg_store.c - PostgreSQL connections and parameterized statements (libpq). */
#include "pg_store.h"

#include <stdio.h>
#include <string.h>

/* libpq's messages end in a newline; a log line should not. */
static void set_error(char *errbuf, size_t errlen, const char *what, const char *msg) {
    size_t n;
    snprintf(errbuf, errlen, "%s: %s", what, msg && *msg ? msg : "unknown error");
    n = strlen(errbuf);
    while (n > 0 && (errbuf[n - 1] == '\n' || errbuf[n - 1] == ' ')) errbuf[--n] = '\0';
}

PGconn *sp_pg_connect(const char *dsn, const char *application_name, char *errbuf, size_t errlen) {
    return sp_pg_connect_timeout(dsn, application_name, 0, errbuf, errlen);
}

PGconn *sp_pg_connect_timeout(const char *dsn, const char *application_name, int timeout_s,
                              char *errbuf, size_t errlen) {
    /* expand_dbname=1: "dbname" holds the whole conninfo; application_name is added beside it and
     * wins, connect_timeout is put before it, so the conninfo's own wins (libpq: the last value
     * of a repeated key word is used). */
    char timeout[16];
    snprintf(timeout, sizeof(timeout), "%d", timeout_s);
    const char *const keys[] = {"connect_timeout", "dbname", "application_name", NULL};
    const char *const values[] = {timeout, dsn, application_name, NULL};
    int first = timeout_s > 0 ? 0 : 1;
    PGconn *pg = PQconnectdbParams(keys + first, values + first, 1);
    if (pg == NULL) {
        snprintf(errbuf, errlen, "postgresql: out of memory");
        return NULL;
    }
    if (PQstatus(pg) != CONNECTION_OK) {
        set_error(errbuf, errlen, "postgresql connect", PQerrorMessage(pg));
        PQfinish(pg);
        return NULL;
    }
    return pg;
}

PGresult *sp_pg_query(PGconn *pg, const char *sql, int nparams, const char *const *params,
                      char *errbuf, size_t errlen) {
    PGresult *res = PQexecParams(pg, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        set_error(errbuf, errlen, "postgresql",
                  res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
        PQclear(res);
        return NULL;
    }
    return res;
}

int sp_pg_exec(PGconn *pg, const char *sql, int nparams, const char *const *params, char *errbuf,
               size_t errlen) {
    PGresult *res = sp_pg_query(pg, sql, nparams, params, errbuf, errlen);
    if (res == NULL) return -1;
    PQclear(res);
    return 0;
}

int sp_pg_ping(PGconn *pg, char *errbuf, size_t errlen) {
    return sp_pg_exec(pg, "SELECT 1", 0, NULL, errbuf, errlen);
}
