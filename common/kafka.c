/* kafka.c - Kafka clients (librdkafka) set up the one way all workers use, and event publishing. */
#include "kafka.h"

#include <stdio.h>
#include <string.h>

#include "log.h"

/* librdkafka's log lines (syslog levels) into the JSON logger. Called from librdkafka's threads;
 * sp_log_write is thread-safe. */
static void on_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    sp_log_level l = level <= 3   ? SP_LOG_ERROR
                     : level <= 4 ? SP_LOG_WARN
                     : level <= 6 ? SP_LOG_INFO
                                  : SP_LOG_DEBUG;
    SP_LOG(l, "kafka %s %s: %s", rd_kafka_name(rk), fac, buf);
}

int sp_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errbuf,
                      size_t errlen) {
    char err[256];
    if (rd_kafka_conf_set(conf, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK) {
        snprintf(errbuf, errlen, "kafka setting %s=%s: %s", name, value, err);
        return -1;
    }
    return 0;
}

rd_kafka_conf_t *sp_kafka_conf_new(const char *brokers, const char *client_id, char *errbuf,
                                   size_t errlen) {
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
        sp_kafka_conf_set(conf, "socket.nagle.disable", "true", errbuf, errlen) != 0) {
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
        snprintf(errbuf, errlen, "kafka client: %s", err);
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
