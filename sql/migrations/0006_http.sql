-- HTTP steps (SPEC §9): the operator's SSRF allow-list and the response size cap, read by the
-- executors before every HTTP call. Both are runtime policy an administrator edits here;
-- users (granted SELECT on df.settings) can read but not change them.
INSERT INTO df.settings (name, value, description) VALUES
    ('http_allowed_hosts', '',
     'addresses HTTP steps may reach despite SSRF protection: IPs, CIDR networks, host names '
     'or *.domain, separated by commas or spaces (empty: only public addresses)'),
    ('http_max_response_bytes', '10485760',
     'largest HTTP response body (after decompression) a step accepts, in bytes');
