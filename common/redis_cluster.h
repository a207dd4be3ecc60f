/* redis_cluster.h - Redis Cluster routing without I/O: a key's slot (CRC16), the slot map read
 *                   from CLUSTER SLOTS, and the redirects a node answers with (MOVED, ASK,
 *                   TRYAGAIN, CLUSTERDOWN). redis_store.c does the talking. */
#ifndef SP_REDIS_CLUSTER_H
#define SP_REDIS_CLUSTER_H

#include <hiredis/hiredis.h>
#include <stddef.h>
#include <stdint.h>

#define SP_CLUSTER_SLOTS 16384
#define SP_CLUSTER_NODES_MAX                                                                       \
    64 /* primaries a map may name (a Redis Cluster tops out at ~1000,                             \
        * stockpipe's sales need a few) */

/* The slot of a key: CRC16 (XMODEM) of the key, or of its hash tag - the bytes between the first
 * '{' and the next '}' when there is at least one byte between them - modulo 16384. */
unsigned sp_cluster_key_slot(const char *key, size_t len);

typedef struct sp_cluster_node {
    char host[256];
    int port;
} sp_cluster_node;

/* Which primary serves each slot. Nodes are only ever added (an index stays valid while the map
 * lives); a slot no primary serves has -1. */
typedef struct sp_cluster_map {
    int nnodes;
    sp_cluster_node nodes[SP_CLUSTER_NODES_MAX];
    int16_t slot_node[SP_CLUSTER_SLOTS];
} sp_cluster_map;

/* Empties m: no node, no slot served. */
void sp_cluster_map_clear(sp_cluster_map *m);

/* The index of host:port in m, added when new; -1 when m is full. */
int sp_cluster_map_node(sp_cluster_map *m, const char *host, int port);

/* Reads a CLUSTER SLOTS reply into m (replacing its slots; known nodes keep their indexes). A
 * primary shown with an empty or "?" address is the node that answered, answered_host. -1 with
 * errbuf for a reply of another shape (m unchanged). */
int sp_cluster_map_read_slots(sp_cluster_map *m, const redisReply *r, const char *answered_host,
                              char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* A key of stockpipe's own that lives on primary `node` of m: "base:{N}" with the smallest N >= 0
 * whose slot that node serves (the reaper's epoch and rebuilt marker: one per primary, so that a
 * primary that loses its data loses its own). -1 when no N up to a bound lands there, or key's
 * cap is too small. */
int sp_cluster_key_on_node(const sp_cluster_map *m, int node, const char *base, char *key,
                           size_t cap) __attribute__((warn_unused_result));

typedef enum sp_cluster_answer {
    SP_CLUSTER_FINAL = 0, /* a reply to keep (a value, or an error of the command itself) */
    SP_CLUSTER_MOVED,     /* the slot lives elsewhere now: refresh the map, send it there */
    SP_CLUSTER_ASK,       /* the slot is being migrated: send ASKING + the command there, once */
    SP_CLUSTER_TRYAGAIN,  /* a multi-key command mid-migration: send it again a little later */
    SP_CLUSTER_DOWN,      /* CLUSTERDOWN: no quorum or the slot is unserved; later, bounded */
} sp_cluster_answer;

/* What a node's reply means for the routing. For MOVED and ASK, *slot and the target (host, port)
 * are filled; a target without a host ("MOVED 5 :7001") is on replied_host. A node refuses
 * with one of these before it runs anything, so a command so answered is sent again safely. */
typedef struct sp_cluster_redirect {
    int slot;
    char host[256];
    int port;
} sp_cluster_redirect;

sp_cluster_answer sp_cluster_answer_of(const redisReply *r, const char *replied_host,
                                       sp_cluster_redirect *to);

#endif
