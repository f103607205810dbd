--
-- response: how each kind of answer from TapTalk maps to the result row.
-- The function never raises for what the server did.
--
-- success: user_id and ticket, error columns NULL
SELECT * FROM taptalk_auth_ticket(req('resp-1'));
-- the same user again gets the same answer (TapTalk updates existing users)
SELECT * FROM taptalk_auth_ticket(req('resp-1'));
-- userID as a JSON number
SELECT * FROM taptalk_auth_ticket(req('fault-numeric-userid'));

-- TapTalk's error envelope: code, field and message as sent
SELECT * FROM taptalk_auth_ticket(req('fault-envelope-field'));
-- an envelope on a 5xx is still TapTalk's verdict; an empty field is NULL
SELECT * FROM taptalk_auth_ticket(req('fault-envelope500'));
-- a wrong key: the server's 40101 envelope
SET taptalk.server_key_secret = 'not-the-secret';
SELECT * FROM taptalk_auth_ticket(req('resp-2'));
RESET taptalk.server_key_secret;
SELECT * FROM taptalk_auth_ticket(req('resp-2'));

-- a member of the root given twice: the later one wins whole, as jsonb
-- reads the body: data without a ticket, so INVALID_RESPONSE
SELECT * FROM taptalk_auth_ticket(req('fault-dup-data'));
-- the later error, without the earlier one's field
SELECT * FROM taptalk_auth_ticket(req('fault-dup-error'));
-- a later null error leaves a success; a later null data leaves none
SELECT * FROM taptalk_auth_ticket(req('fault-dup-error-null'));
SELECT * FROM taptalk_auth_ticket(req('fault-dup-data-null'));
-- what jsonb makes of the first two bodies
SELECT '{"data":{"userID":"tt-first","ticket":"ticket-first"},"data":{"userID":"tt-later"}}'::jsonb AS dup_data,
	   '{"error":{"code":"40002","field":"107"},"error":{"code":"40101"}}'::jsonb AS dup_error;

-- non-2xx without the envelope: HTTP_ERROR with the status
SET taptalk.max_retries = 0;
SELECT * FROM taptalk_auth_ticket(req('fault-html500'));
SELECT * FROM taptalk_auth_ticket(req('fault-status-404'));
SELECT * FROM taptalk_auth_ticket(req('fault-status-502'));
RESET taptalk.max_retries;

-- 2xx that is not a usable envelope: INVALID_RESPONSE
SELECT * FROM taptalk_auth_ticket(req('fault-badjson'));
SELECT * FROM taptalk_auth_ticket(req('fault-notjson'));
SELECT * FROM taptalk_auth_ticket(req('fault-emptybody'));
SELECT * FROM taptalk_auth_ticket(req('fault-noticket'));
SELECT * FROM taptalk_auth_ticket(req('fault-nul'));
SELECT * FROM taptalk_auth_ticket(req('fault-badutf8'));
SELECT * FROM taptalk_auth_ticket(req('fault-deep-10000'));
SELECT * FROM taptalk_auth_ticket(req('fault-deep-50'));
-- bodies over 1 MiB are refused: announced by Content-Length, or cut off
-- while reading when the length is not announced
SELECT * FROM taptalk_auth_ticket(req('fault-huge-5'));
SELECT * FROM taptalk_auth_ticket(req('fault-hugechunked-5'));
SELECT * FROM taptalk_auth_ticket(req('fault-bigticket'));
