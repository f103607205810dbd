--
-- trigger: provisioning users from a BEFORE INSERT trigger.  A failed
-- provisioning is recorded in the row; the insert is never lost.
--
CREATE TABLE app_user (
	id int PRIMARY KEY,
	full_name text NOT NULL,
	email text,
	platform text NOT NULL DEFAULT 'web',
	taptalk_user_id text,
	taptalk_error text
);

CREATE FUNCTION app_user_provision() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	r taptalk_auth_ticket_result;
BEGIN
	r := taptalk_auth_ticket(jsonb_build_object(
		'userIPAddress', '10.0.0.1',
		'userAgent', 'app-backend',
		'userPlatform', NEW.platform,
		'userDeviceID', 'server',
		'xcUserID', NEW.id,
		'fullName', NEW.full_name,
		'email', NEW.email));
	NEW.taptalk_user_id := r.user_id;
	NEW.taptalk_error := CASE WHEN r.error_code IS NOT NULL
						 THEN r.error_code || coalesce('/' || r.error_field, '') END;
	RETURN NEW;
END $$;

CREATE TRIGGER app_user_provision BEFORE INSERT ON app_user
	FOR EACH ROW EXECUTE FUNCTION app_user_provision();

SET taptalk.timeout = 500;
INSERT INTO app_user (id, full_name, email) VALUES (1, 'Ann', 'ann@example.com');
INSERT INTO app_user (id, full_name, email) VALUES (2, 'Bob', NULL);
-- a validation failure: blank name
INSERT INTO app_user (id, full_name) VALUES (3, '  ');
-- a bad platform
INSERT INTO app_user (id, full_name, platform) VALUES (4, 'Dee', 'symbian');
-- the server cannot be reached
SET taptalk.base_url = 'http://127.0.0.1:1';
SET taptalk.max_retries = 0;
INSERT INTO app_user (id, full_name) VALUES (5, 'Eve');
RESET taptalk.base_url;
RESET taptalk.max_retries;
-- several rows in one statement
INSERT INTO app_user (id, full_name) SELECT i, 'user ' || i FROM generate_series(6, 8) i;
RESET taptalk.timeout;

SELECT id, full_name, taptalk_user_id, taptalk_error FROM app_user ORDER BY id;

-- a later retry of the failed ones, as an application would do
UPDATE app_user u SET taptalk_user_id = r.user_id, taptalk_error = r.error_code
FROM app_user a, LATERAL taptalk_auth_ticket(jsonb_build_object(
		'userIPAddress', '10.0.0.1', 'userAgent', 'app-backend',
		'userPlatform', 'web', 'userDeviceID', 'server',
		'xcUserID', a.id, 'fullName', 'Eve')) r
WHERE u.id = a.id AND a.id = 5;
SELECT id, taptalk_user_id, taptalk_error FROM app_user WHERE id = 5;
