/* lua_scripts.h - the Lua scripts of common/lua/, embedded at build time (scripts/embed-lua.sh). */
#ifndef SP_LUA_SCRIPTS_H
#define SP_LUA_SCRIPTS_H

extern const char sp_lua_sale_open[];
extern const char sp_lua_restock[];
extern const char sp_lua_reserve[];
extern const char sp_lua_confirm[];
extern const char sp_lua_release[];
extern const char sp_lua_cap[];

#endif
