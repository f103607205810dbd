--
-- retries: the HTTP status decides what is retried, whatever the body (an
-- envelope, text or nothing), and a Retry-After is waited when it fits in
-- the request's taptalk.timeout.  The mock's fault-answer-<status>-<body>-
-- <after>-<n>-<token> answers the first n requests for <token> that way.
--
SET taptalk.timeout = 5000;

-- a 429 in TapTalk's envelope is retried, after its Retry-After (1 s)
SELECT mock_mark() AS mark, clock_timestamp() AS t0 \gset
SELECT * FROM taptalk_auth_ticket(req('fault-answer-429-env-1-1-a'));
SELECT count(*) AS attempts,
	   clock_timestamp() - :'t0' >= interval '900 ms' AS waited_retry_after
FROM mock_requests(:mark);

-- a 429 without an envelope or a Retry-After, plain text or no body at all
SELECT mock_mark() AS mark \gset
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-429-text-none-1-b'));
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-429-empty-none-1-c'));
SELECT count(*) AS attempts FROM mock_requests(:mark);

-- a 503 and a 502 in TapTalk's envelope are retried; the 503's Retry-After
-- as an HTTP-date (about 2 s from the answer) is waited
SELECT mock_mark() AS mark, clock_timestamp() AS t0 \gset
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-503-env-date2-1-d'));
SELECT count(*) AS attempts,
	   clock_timestamp() - :'t0' >= interval '900 ms' AS waited_retry_after
FROM mock_requests(:mark);
SELECT mock_mark() AS mark \gset
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-502-env-none-2-e'));
SELECT count(*) AS attempts FROM mock_requests(:mark);

-- a Retry-After longer than what is left of taptalk.timeout: no retry, the
-- call returns at once with TapTalk's code and message
SELECT mock_mark() AS mark, clock_timestamp() AS t0 \gset
SELECT * FROM taptalk_auth_ticket(req('fault-answer-429-env-30-1-f'));
SELECT count(*) AS attempts,
	   clock_timestamp() - :'t0' < interval '2.5 s' AS returned_at_once
FROM mock_requests(:mark);
-- nor one longer than 60 s, even when taptalk.timeout would allow it
SET taptalk.timeout = '3min';
SELECT mock_mark() AS mark, clock_timestamp() AS t0 \gset
SELECT * FROM taptalk_auth_ticket(req('fault-answer-503-env-90-1-g'));
SELECT count(*) AS attempts,
	   clock_timestamp() - :'t0' < interval '2.5 s' AS returned_at_once
FROM mock_requests(:mark);
SET taptalk.timeout = 5000;

-- a Retry-After that is absurd (over a day), negative or not a time is
-- ignored: the usual backoff, and the retry succeeds
SELECT mock_mark() AS mark, clock_timestamp() AS t0 \gset
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-429-env-99999999999-1-h'));
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-429-env-neg5-1-i'));
SELECT user_id, error_code FROM taptalk_auth_ticket(req('fault-answer-503-text-junk-1-j'));
SELECT count(*) AS attempts,
	   clock_timestamp() - :'t0' < interval '2.5 s' AS no_wait
FROM mock_requests(:mark);

-- retries used up: the row keeps TapTalk's code and message (not retried
-- more than taptalk.max_retries times)
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-answer-429-env-none-9-k'));
SELECT count(*) AS attempts FROM mock_requests(:mark);

-- a 4xx other than 429 in TapTalk's envelope, and a 500, stay final
SELECT mock_mark() AS mark \gset
SELECT * FROM taptalk_auth_ticket(req('fault-answer-400-env-none-1-l'));
SELECT * FROM taptalk_auth_ticket(req('fault-answer-500-env-none-1-m'));
SELECT count(*) AS attempts FROM mock_requests(:mark);

-- taptalk_auth_tickets retries the same way, each request on its own
SELECT mock_mark() AS mark \gset
SELECT ord, user_id, error_code
FROM taptalk_auth_tickets(ARRAY[req('fault-answer-429-env-1-1-n1'),
	req('fault-answer-429-text-none-1-n2'), req('fault-answer-503-env-none-1-n3'),
	req('fault-answer-429-env-30-1-n4'), req('fault-answer-400-env-none-1-n5')])
ORDER BY ord;
SELECT count(*) AS attempts FROM mock_requests(:mark);
RESET taptalk.timeout;
