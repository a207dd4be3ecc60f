/* redis_cluster.c - Redis Cluster routing without I/O: key slots, the slot map, the redirects. */
#include "redis_cluster.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* CRC16, the XMODEM variant Redis Cluster uses: polynomial 0x1021, initial value 0, most
 * significant bit first. Keys are short; a bit loop is plenty. */
static uint16_t crc16(const unsigned char *p, size_t len) {
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int bit = 0; bit < 8; bit++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

unsigned sp_cluster_key_slot(const char *key, size_t len) {
    const char *open = memchr(key, '{', len);
    if (open != NULL) {
        size_t from = (size_t)(open - key) + 1;
        const char *close = memchr(open + 1, '}', len - from);
        if (close != NULL && close > open + 1) /* "{}" is no tag: the whole key counts */
            return crc16((const unsigned char *)open + 1, (size_t)(close - open - 1)) &
                   (SP_CLUSTER_SLOTS - 1);
    }
    return crc16((const unsigned char *)key, len) & (SP_CLUSTER_SLOTS - 1);
}

int sp_cluster_key_on_node(const sp_cluster_map *m, int node, const char *base, char *key,
                           size_t cap) {
    if (node < 0) return -1;
    for (int n = 0; n < 1000000; n++) {
        int len = snprintf(key, cap, "%s:{%d}", base, n);
        if (len < 0 || (size_t)len >= cap) return -1;
        if (m->slot_node[sp_cluster_key_slot(key, (size_t)len)] == node) return 0;
    }
    return -1;
}

void sp_cluster_map_clear(sp_cluster_map *m) {
    m->nnodes = 0;
    for (int s = 0; s < SP_CLUSTER_SLOTS; s++) m->slot_node[s] = -1;
}

int sp_cluster_map_node(sp_cluster_map *m, const char *host, int port) {
    for (int i = 0; i < m->nnodes; i++)
        if (m->nodes[i].port == port && strcmp(m->nodes[i].host, host) == 0) return i;
    if (m->nnodes >= SP_CLUSTER_NODES_MAX || strlen(host) >= sizeof(m->nodes[0].host)) return -1;
    snprintf(m->nodes[m->nnodes].host, sizeof(m->nodes[0].host), "%s", host);
    m->nodes[m->nnodes].port = port;
    return m->nnodes++;
}

static int is_int(const redisReply *r) { return r != NULL && r->type == REDIS_REPLY_INTEGER; }

int sp_cluster_map_read_slots(sp_cluster_map *m, const redisReply *r, const char *answered_host,
                              char *errbuf, size_t errlen) {
    int16_t *slots = NULL;
    int nbefore = m->nnodes, rc = -1;
    if (r == NULL || r->type != REDIS_REPLY_ARRAY) {
        snprintf(errbuf, errlen, "CLUSTER SLOTS: %s",
                 r && r->type == REDIS_REPLY_ERROR ? r->str : "not an array");
        return -1;
    }
    slots = malloc(sizeof(int16_t) * SP_CLUSTER_SLOTS);
    if (slots == NULL) {
        snprintf(errbuf, errlen, "CLUSTER SLOTS: out of memory");
        return -1;
    }
    for (int s = 0; s < SP_CLUSTER_SLOTS; s++) slots[s] = -1;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *range = r->element[i], *primary;
        if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 || !is_int(range->element[0]) ||
            !is_int(range->element[1]))
            goto shape;
        long long from = range->element[0]->integer, to = range->element[1]->integer;
        primary = range->element[2];
        if (from < 0 || to < from || to >= SP_CLUSTER_SLOTS || primary->type != REDIS_REPLY_ARRAY ||
            primary->elements < 2 || primary->element[0]->type != REDIS_REPLY_STRING ||
            !is_int(primary->element[1]))
            goto shape;
        const char *host = primary->element[0]->str;
        long long port = primary->element[1]->integer;
        if (host[0] == '\0' || strcmp(host, "?") == 0) host = answered_host;
        if (port < 1 || port > 65535) goto shape;
        int node = sp_cluster_map_node(m, host, (int)port);
        if (node < 0) {
            snprintf(errbuf, errlen,
                     "CLUSTER SLOTS: more than %d primaries or a host name over %zu "
                     "bytes",
                     SP_CLUSTER_NODES_MAX, sizeof(m->nodes[0].host) - 1);
            goto undo;
        }
        for (long long s = from; s <= to; s++) slots[s] = (int16_t)node;
    }
    memcpy(m->slot_node, slots, sizeof(int16_t) * SP_CLUSTER_SLOTS);
    rc = 0;
    goto out;
shape:
    snprintf(errbuf, errlen, "CLUSTER SLOTS: unexpected reply shape");
undo: /* the nodes this reply added go again: m stays as it was */
    m->nnodes = nbefore;
out:
    free(slots);
    return rc;
}

/* Reads "SLOT HOST:PORT" (HOST may be empty, or an IPv6 address: the port follows the last ':'). */
static int read_target(const char *s, const char *replied_host, sp_cluster_redirect *to) {
    char *end;
    long slot = strtol(s, &end, 10);
    if (end == s || *end != ' ' || slot < 0 || slot >= SP_CLUSTER_SLOTS) return -1;
    const char *addr = end + 1, *colon = strrchr(addr, ':');
    if (colon == NULL) return -1;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || port < 1 || port > 65535) return -1;
    size_t hlen = (size_t)(colon - addr);
    if (hlen >= sizeof(to->host)) return -1;
    if (hlen == 0)
        snprintf(to->host, sizeof(to->host), "%s", replied_host);
    else
        memcpy(to->host, addr, hlen), to->host[hlen] = '\0';
    to->slot = (int)slot;
    to->port = (int)port;
    return 0;
}

sp_cluster_answer sp_cluster_answer_of(const redisReply *r, const char *replied_host,
                                       sp_cluster_redirect *to) {
    if (r == NULL || r->type != REDIS_REPLY_ERROR) return SP_CLUSTER_FINAL;
    if (strncmp(r->str, "MOVED ", 6) == 0)
        return read_target(r->str + 6, replied_host, to) == 0 ? SP_CLUSTER_MOVED : SP_CLUSTER_FINAL;
    if (strncmp(r->str, "ASK ", 4) == 0)
        return read_target(r->str + 4, replied_host, to) == 0 ? SP_CLUSTER_ASK : SP_CLUSTER_FINAL;
    if (strncmp(r->str, "TRYAGAIN", 8) == 0) return SP_CLUSTER_TRYAGAIN;
    if (strncmp(r->str, "CLUSTERDOWN", 11) == 0) return SP_CLUSTER_DOWN;
    return SP_CLUSTER_FINAL;
}
