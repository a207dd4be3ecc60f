/* kafka.c - Kafka clients (librdkafka) set up the one way all workers use, and event publishing. */
#include "kafka.h"

#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "log.h"

/* The last connection failure librdkafka reported (a "FAIL" log line: a refused login, a
 * certificate that did not verify, a refused connection) in any client of this process, and
 * when (monotonic ms). A metadata request that fails only says "Broker transport failure"; this
 * says why, for /readyz. Written from librdkafka's threads, hence the lock. librdkafka's words
 * never hold a password. */
static pthread_mutex_t last_fail_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_fail[300];
static int64_t last_fail_ms;

#define LAST_FAIL_FRESH_MS 30000

/* librdkafka's log lines (syslog levels) into the JSON logger. Called from librdkafka's threads;
 * sp_log_write is thread-safe. */
static void on_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    sp_log_level l = level <= 3   ? SP_LOG_ERROR
                     : level <= 4 ? SP_LOG_WARN
                     : level <= 6 ? SP_LOG_INFO
                                  : SP_LOG_DEBUG;
    SP_LOG(l, "kafka %s %s: %s", rd_kafka_name(rk), fac, buf);
    if (level <= 4 && strcmp(fac, "FAIL") == 0) {
        /* "[thrd:...]: sasl_ssl://host:port/bootstrap: SASL authentication error: ...": the
         * reason alone (the broker's name would crowd it out of /readyz's bounded text). */
        const char *why = strstr(buf, "]: "), *next;
        why = why ? why + 3 : buf;
        next = strstr(why, ": ");
        if (next && memmem(why, (size_t)(next - why), "://", 3)) why = next + 2;
        pthread_mutex_lock(&last_fail_lock);
        snprintf(last_fail, sizeof(last_fail), "%s", why);
        last_fail_ms = sp_clock_mono_ms();
        pthread_mutex_unlock(&last_fail_lock);
    }
}

/* Appends "; last connection failure: ..." to errbuf when librdkafka reported one lately. */
static void append_last_fail(char *errbuf, size_t errlen) {
    size_t n = strlen(errbuf);
    pthread_mutex_lock(&last_fail_lock);
    if (last_fail[0] && sp_clock_mono_ms() - last_fail_ms < LAST_FAIL_FRESH_MS && n < errlen)
        snprintf(errbuf + n, errlen - n, "; last connection failure: %s", last_fail);
    pthread_mutex_unlock(&last_fail_lock);
}

/* A librdkafka property whose value is a secret (or, misspelt, may be one): never put into a
 * message. */
static int secret_property(const char *name) {
    static const char *const words[] = {"pass", "pasw", "pwd", "secret", "jaas", "token"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (strstr(name, words[i])) return 1;
    return strcmp(name, "sasl.oauthbearer.config") == 0;
}

int sp_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errbuf,
                      size_t errlen) {
    char err[256];
    if (rd_kafka_conf_set(conf, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK) {
        /* librdkafka's own words may quote the value ("Invalid value "..." for ..."). */
        if (secret_property(name))
            snprintf(errbuf, errlen, "kafka setting %s refused (its value is not shown)", name);
        else
            snprintf(errbuf, errlen, "kafka setting %s=%s: %s", name, value, err);
        return -1;
    }
    return 0;
}

/* The settings of the config table that become librdkafka properties of every client. */
static const struct {
    const char *prop, *env;
    size_t offset;
} security_props[] = {
    {"security.protocol", "KAFKA_SECURITY_PROTOCOL", offsetof(sp_config, kafka_security_protocol)},
    {"sasl.mechanisms", "KAFKA_SASL_MECHANISM", offsetof(sp_config, kafka_sasl_mechanism)},
    {"sasl.username", "KAFKA_SASL_USERNAME", offsetof(sp_config, kafka_sasl_username)},
    {"sasl.password", "KAFKA_SASL_PASSWORD", offsetof(sp_config, kafka_sasl_password)},
    {"ssl.ca.location", "KAFKA_SSL_CA_LOCATION", offsetof(sp_config, kafka_ssl_ca_location)},
    {"ssl.certificate.location", "KAFKA_SSL_CERTIFICATE_LOCATION",
     offsetof(sp_config, kafka_ssl_certificate_location)},
    {"ssl.key.location", "KAFKA_SSL_KEY_LOCATION", offsetof(sp_config, kafka_ssl_key_location)},
    {"ssl.key.password", "KAFKA_SSL_KEY_PASSWORD", offsetof(sp_config, kafka_ssl_key_password)},
};
#define NSECURITY (sizeof(security_props) / sizeof(security_props[0]))

/* librdkafka before 2.6.1 repeats its own nonce in SCRAM's last message (librdkafka#4895). Kafka
 * 3.x brokers let that pass (3.8.1 and 3.9 check only the end of it), 4.x brokers compare the
 * whole nonce and refuse the login. Said once per process. */
static void warn_old_scram(const sp_config *cfg) {
    static int warned;
    if (strncmp(cfg->kafka_sasl_mechanism, "SCRAM-", 6) != 0 || rd_kafka_version() >= 0x020601ff ||
        __atomic_exchange_n(&warned, 1, __ATOMIC_RELAXED))
        return;
    sp_warn("KAFKA_SASL_MECHANISM=%s with librdkafka %s: before 2.6.1 librdkafka cannot log in to "
            "Kafka 4.x brokers with SCRAM (librdkafka#4895; 3.x brokers accept it). Against 4.x "
            "use PLAIN over sasl_ssl, or a newer librdkafka",
            cfg->kafka_sasl_mechanism, rd_kafka_version_str());
}

int sp_kafka_conf_security(rd_kafka_conf_t *conf, const sp_config *cfg, char *errbuf,
                           size_t errlen) {
    warn_old_scram(cfg);
    for (size_t i = 0; i < NSECURITY; i++) {
        const char *value = (const char *)cfg + security_props[i].offset;
        const char *prop = security_props[i].prop;
        char err[256];
        if (value[0] == '\0') continue; /* librdkafka's default */
        if (rd_kafka_conf_set(conf, prop, value, err, sizeof(err)) == RD_KAFKA_CONF_OK) continue;
        if (secret_property(prop))
            snprintf(errbuf, errlen,
                     "%s is refused by librdkafka (its property %s; the value is not shown)",
                     security_props[i].env, prop);
        else
            snprintf(errbuf, errlen, "%s=%s is refused by librdkafka (its property %s): %s",
                     security_props[i].env, value, prop, err);
        return -1;
    }
    return 0;
}

rd_kafka_conf_t *sp_kafka_conf_new(const char *brokers, const char *client_id,
                                   const sp_config *security, char *errbuf, size_t errlen) {
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (conf == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    if (sp_kafka_conf_set(conf, "bootstrap.servers", brokers, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "client.id", client_id, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(conf, "socket.keepalive.enable", "true", errbuf, errlen) != 0 ||
        /* TCP_NODELAY, as Kafka's own clients set: a small produce request (one order) is not
         * held back by Nagle's algorithm waiting for the broker's delayed ACK. */
        sp_kafka_conf_set(conf, "socket.nagle.disable", "true", errbuf, errlen) != 0 ||
        (security && sp_kafka_conf_security(conf, security, errbuf, errlen) != 0)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_log_cb(conf, on_kafka_log);
    return conf;
}

/* rd_kafka_new takes the conf only when it succeeds; this owns it on every path. */
static rd_kafka_t *client_new(rd_kafka_type_t type, rd_kafka_conf_t **conf, char *errbuf,
                              size_t errlen) {
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(type, *conf, err, sizeof(err));
    if (rk == NULL) {
        /* E.g. "ssl.key.location failed: ... bad decrypt": name the setting behind it. */
        const char *env = NULL;
        for (size_t i = 0; i < NSECURITY && env == NULL; i++)
            if (strstr(err, security_props[i].prop)) env = security_props[i].env;
        if (env && strcmp(env, "KAFKA_SSL_KEY_LOCATION") == 0)
            env = "KAFKA_SSL_KEY_LOCATION (and KAFKA_SSL_KEY_PASSWORD)";
        snprintf(errbuf, errlen, "kafka client: %s%s%s", err, env ? "; check " : "",
                 env ? env : "");
        rd_kafka_conf_destroy(*conf);
    }
    *conf = NULL;
    return rk;
}

rd_kafka_t *sp_kafka_producer_new(rd_kafka_conf_t **conf, char *errbuf, size_t errlen) {
    if (sp_kafka_conf_set(*conf, "acks", "all", errbuf, errlen) != 0 ||
        sp_kafka_conf_set(*conf, "enable.idempotence", "true", errbuf, errlen) != 0) {
        rd_kafka_conf_destroy(*conf);
        *conf = NULL;
        return NULL;
    }
    return client_new(RD_KAFKA_PRODUCER, conf, errbuf, errlen);
}

rd_kafka_t *sp_kafka_consumer_new(rd_kafka_conf_t **conf, const char *group, char *errbuf,
                                  size_t errlen) {
    rd_kafka_t *rk;
    if (sp_kafka_conf_set(*conf, "group.id", group, errbuf, errlen) != 0 ||
        sp_kafka_conf_set(*conf, "enable.auto.commit", "false", errbuf, errlen) != 0 ||
        sp_kafka_conf_set(*conf, "enable.auto.offset.store", "false", errbuf, errlen) != 0 ||
        sp_kafka_conf_set(*conf, "auto.offset.reset", "earliest", errbuf, errlen) != 0) {
        rd_kafka_conf_destroy(*conf);
        *conf = NULL;
        return NULL;
    }
    rk = client_new(RD_KAFKA_CONSUMER, conf, errbuf, errlen);
    if (rk) rd_kafka_poll_set_consumer(rk);
    return rk;
}

int sp_kafka_topic_partitions(rd_kafka_t *rk, const char *topic, int timeout_ms, int *npartitions,
                              char *errbuf, size_t errlen) {
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    int rc = -1;
    if (rkt == NULL) {
        snprintf(errbuf, errlen, "topic %s: %s", topic, rd_kafka_err2str(rd_kafka_last_error()));
        return -1;
    }
    rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, timeout_ms);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka metadata for %s: %s", topic, rd_kafka_err2str(err));
        append_last_fail(errbuf, errlen);
        goto out;
    }
    if (md->topic_cnt != 1 || md->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka topic %s: %s", topic,
                 md->topic_cnt ? rd_kafka_err2str(md->topics[0].err) : "not in metadata");
        goto out;
    }
    for (int i = 0; i < md->topics[0].partition_cnt; i++)
        if (md->topics[0].partitions[i].leader < 0) {
            snprintf(errbuf, errlen, "kafka topic %s partition %d has no leader", topic,
                     md->topics[0].partitions[i].id);
            goto out;
        }
    *npartitions = md->topics[0].partition_cnt;
    rc = 0;
out:
    if (md) rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    return rc;
}

int sp_kafka_produce_event(rd_kafka_t *rk, const char *topic, const sp_event *ev, void *msg_opaque,
                           char *errbuf, size_t errlen) {
    char buf[SP_EVENT_MAX], key[24];
    size_t len = 0;
    if (sp_event_encode(ev, buf, sizeof(buf), &len, errbuf, errlen) != 0) return -1;
    int keylen = snprintf(key, sizeof(key), "%lld", (long long)ev->sku_id);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, (size_t)keylen),
        RD_KAFKA_V_VALUE(buf, len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_OPAQUE(msg_opaque), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka produce to %s: %s", topic, rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}

/* ---- the consumer side ---- */

int sp_kafka_produce_dead_letter(rd_kafka_t *rk, const char *dlq_topic, const char *src_topic,
                                 int32_t partition, int64_t offset, const void *key, size_t keylen,
                                 const void *value, size_t len, const char *reason,
                                 void *msg_opaque, char *errbuf, size_t errlen) {
    char part[16], off[24];
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(4);
    if (hdrs == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    snprintf(part, sizeof(part), "%d", (int)partition);
    snprintf(off, sizeof(off), "%lld", (long long)offset);
    rd_kafka_header_add(hdrs, "reason", -1, reason, -1);
    rd_kafka_header_add(hdrs, "topic", -1, src_topic, -1);
    rd_kafka_header_add(hdrs, "partition", -1, part, -1);
    rd_kafka_header_add(hdrs, "offset", -1, off, -1);
    /* producev owns the headers only when it succeeds. */
    rd_kafka_resp_err_t err = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC(dlq_topic), RD_KAFKA_V_KEY(key, key ? keylen : 0),
        RD_KAFKA_V_VALUE((void *)value, value ? len : 0), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(msg_opaque), RD_KAFKA_V_END);
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rd_kafka_headers_destroy(hdrs);
        snprintf(errbuf, errlen, "kafka produce to %s: %s", dlq_topic, rd_kafka_err2str(err));
        return -1;
    }
    return 0;
}

/* Runs one admin request already sent on queue q and checks the one topic result it returns. */
static int admin_wait(rd_kafka_queue_t *q, rd_kafka_event_type_t want, const char *what,
                      const char *topic, int timeout_ms, char *errbuf, size_t errlen) {
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, timeout_ms + 1000);
    const rd_kafka_topic_result_t **res = NULL;
    size_t n = 0;
    int rc = -1;
    if (ev == NULL) {
        snprintf(errbuf, errlen, "kafka %s %s: no answer within %d ms", what, topic, timeout_ms);
        return -1;
    }
    if (rd_kafka_event_type(ev) != want) {
        snprintf(errbuf, errlen, "kafka %s %s: unexpected event %s", what, topic,
                 rd_kafka_event_name(ev));
        goto out;
    }
    if (rd_kafka_event_error(ev) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(errbuf, errlen, "kafka %s %s: %s", what, topic, rd_kafka_event_error_string(ev));
        goto out;
    }
    if (want == RD_KAFKA_EVENT_CREATETOPICS_RESULT)
        res = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    else
        res = rd_kafka_DeleteTopics_result_topics(rd_kafka_event_DeleteTopics_result(ev), &n);
    if (n != 1) {
        snprintf(errbuf, errlen, "kafka %s %s: %zu results", what, topic, n);
        goto out;
    }
    if (rd_kafka_topic_result_error(res[0]) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        const char *msg = rd_kafka_topic_result_error_string(res[0]);
        snprintf(errbuf, errlen, "kafka %s %s: %s", what, topic,
                 msg ? msg : rd_kafka_err2str(rd_kafka_topic_result_error(res[0])));
        goto out;
    }
    rc = 0;
out:
    rd_kafka_event_destroy(ev);
    return rc;
}

/* The queue and options of one admin request on topic, with its operation timeout set; both NULL
 * and -1 with errbuf when they cannot be made. admin_end() frees them. */
static int admin_begin(rd_kafka_t *rk, rd_kafka_admin_op_t op, const char *what, const char *topic,
                       int timeout_ms, rd_kafka_queue_t **q, rd_kafka_AdminOptions_t **opts,
                       char *errbuf, size_t errlen) {
    char err[256];
    *q = rd_kafka_queue_new(rk);
    *opts = rd_kafka_AdminOptions_new(rk, op);
    if (*q == NULL || *opts == NULL)
        snprintf(errbuf, errlen, "out of memory");
    else if (rd_kafka_AdminOptions_set_operation_timeout(*opts, timeout_ms, err, sizeof(err)) != 0)
        snprintf(errbuf, errlen, "kafka %s %s: %s", what, topic, err);
    else
        return 0;
    return -1;
}

static void admin_end(rd_kafka_queue_t *q, rd_kafka_AdminOptions_t *opts) {
    if (opts) rd_kafka_AdminOptions_destroy(opts);
    if (q) rd_kafka_queue_destroy(q);
}

int sp_kafka_topic_create(rd_kafka_t *rk, const char *topic, int npartitions, int timeout_ms,
                          char *errbuf, size_t errlen) {
    char err[256];
    rd_kafka_queue_t *q;
    rd_kafka_AdminOptions_t *opts;
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(topic, npartitions, 1, err, sizeof(err));
    int rc = -1;
    if (nt == NULL) {
        snprintf(errbuf, errlen, "kafka create topic %s: %s", topic, err);
        return -1;
    }
    if (admin_begin(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS, "create topic", topic, timeout_ms, &q,
                    &opts, errbuf, errlen) == 0) {
        rd_kafka_CreateTopics(rk, &nt, 1, opts, q);
        rc = admin_wait(q, RD_KAFKA_EVENT_CREATETOPICS_RESULT, "create topic", topic, timeout_ms,
                        errbuf, errlen);
    }
    admin_end(q, opts);
    rd_kafka_NewTopic_destroy(nt);
    return rc;
}

int sp_kafka_topic_delete(rd_kafka_t *rk, const char *topic, int timeout_ms, char *errbuf,
                          size_t errlen) {
    rd_kafka_queue_t *q;
    rd_kafka_AdminOptions_t *opts;
    rd_kafka_DeleteTopic_t *dt = rd_kafka_DeleteTopic_new(topic);
    int rc = -1;
    if (dt == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return -1;
    }
    if (admin_begin(rk, RD_KAFKA_ADMIN_OP_DELETETOPICS, "delete topic", topic, timeout_ms, &q,
                    &opts, errbuf, errlen) == 0) {
        rd_kafka_DeleteTopics(rk, &dt, 1, opts, q);
        rc = admin_wait(q, RD_KAFKA_EVENT_DELETETOPICS_RESULT, "delete topic", topic, timeout_ms,
                        errbuf, errlen);
    }
    admin_end(q, opts);
    rd_kafka_DeleteTopic_destroy(dt);
    return rc;
}
