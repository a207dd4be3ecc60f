/* lua_scripts.h - the Lua scripts of common/lua/, embedded at build time (scripts/embed-lua.sh). */
#ifndef SP_LUA_SCRIPTS_H
#define SP_LUA_SCRIPTS_H

extern const char sp_lua_sale_claim[];
extern const char sp_lua_sale_open[];
extern const char sp_lua_sale_unclaim[];
extern const char sp_lua_restock[];
extern const char sp_lua_reserve[];
extern const char sp_lua_confirm[];
extern const char sp_lua_release[];
extern const char sp_lua_cap[];
extern const char sp_lua_rejected_forget[];
/* the reaper's (docs/reaper.md) */
extern const char sp_lua_give_back[];
extern const char sp_lua_resv_drop[];
extern const char sp_lua_reconcile_pause[];
extern const char sp_lua_reconcile_apply[];
extern const char sp_lua_reconcile_adjust[];
extern const char sp_lua_reconcile_open[];
extern const char sp_lua_reconcile_stage[];
/* stock transfers between the shards of a sharded sale (issue 17 part 3, not used by the
 * workers yet) */
extern const char sp_lua_shard_take[];
extern const char sp_lua_shard_give[];
extern const char sp_lua_shard_done[];

#endif
