--
-- privileges: who may point the request, read the key and call the function.
--
-- the settings' contexts and flags (but taptalk.stats_kind_id, which only
-- PostgreSQL 18 has: see stats)
SELECT name, context, vartype, unit, min_val, max_val, boot_val
FROM pg_settings WHERE name LIKE 'taptalk.%' AND name <> 'taptalk.stats_kind_id'
ORDER BY name;

\c - taptalk_app
-- a non-superuser cannot SET where the request goes, nor the key
SET taptalk.base_url = 'http://attacker.example';
SET taptalk.server_key_id = 'x';
SET taptalk.server_key_secret = 'x';
SET taptalk.ca_file = '/tmp/evil.pem';
SELECT set_config('taptalk.base_url', 'http://attacker.example', true);
-- but may tune its own timeouts
SET taptalk.timeout = '2s';
SHOW taptalk.timeout;
RESET taptalk.timeout;
-- cannot read the secret by any route (42501: insufficient privilege)
SELECT sqlstate_of('SHOW taptalk.server_key_secret');
SELECT sqlstate_of($$SELECT current_setting('taptalk.server_key_secret')$$);
SELECT count(*) FROM pg_settings WHERE name = 'taptalk.server_key_secret';
SELECT count(*) FROM pg_file_settings WHERE name LIKE 'taptalk.%';
SELECT count(*) AS rows_with_secret
FROM pg_settings WHERE setting LIKE '%' || 'test-key-secret' || '%';
-- the key id and the base URL are not secret
SHOW taptalk.server_key_id;
-- cannot call the function until granted
SELECT * FROM taptalk_auth_ticket(req('priv-1'));
SELECT * FROM taptalk_auth_tickets(ARRAY[req('priv-1')]);

\c - taptalk_caller
SELECT * FROM taptalk_auth_ticket(req('priv-2'));
SELECT sqlstate_of('SHOW taptalk.server_key_secret');

\c - postgres
-- the secret is shown masked to every role that may look at it: a superuser
SHOW taptalk.server_key_secret;
SELECT current_setting('taptalk.server_key_secret') AS superuser_sees;
-- and members of pg_read_all_settings (pg_monitor is one), which may look
-- at superuser-only settings; pg_settings never lists the secret
SET ROLE pg_monitor;
SHOW taptalk.server_key_secret;
SELECT current_setting('taptalk.server_key_secret') AS pg_monitor_sees;
SELECT set_config('taptalk.server_key_secret', 'x', true);
SELECT count(*) FROM pg_settings WHERE name = 'taptalk.server_key_secret';
RESET ROLE;
-- the value is still in effect (the mock checks the Server-Key header)
SELECT * FROM taptalk_auth_ticket(req('priv-masked'));
-- not set: nothing to mask
BEGIN;
SET LOCAL taptalk.server_key_secret = '';
SHOW taptalk.server_key_secret;
ROLLBACK;
