-- AIGNE Hub REST bridge: the parts of OpenAI's REST API that the gRPC-JSON transcoder
-- cannot express by itself. Runs before the transcoder on requests (so after it on
-- responses). Loaded by envoy.yaml (default_source_code.filename).
--
-- Requests:
--   * POST /chat/completions and /v1/chat/completions are re-routed to the internal
--     bindings of BridgeService (server/api/bridge.py), which answers with the exact
--     JSON or server-sent events the client gets (`google.api.HttpBody`): this filter
--     does no work on those answers but for errors. Those whose top-level "stream" is
--     true go to its stream, with the header `x-aigne-bridge: sse` that asks the
--     server for `data: [DONE]` and for an error event after the first chunk.
--   * /internal/... sent by a client is answered 404.
--   * Native gRPC (content-type application/grpc...) is marked `x-aigne-bridge: grpc`
--     for the local reply that tells it to use the gRPC port (see envoy.yaml).
--   * The JSON bodies of OpenAI's operations (OPENAI_BODIES): the names of their
--     top-level members go to the server as `x-aigne-fields`, so that it can refuse
--     a parameter the contract does not carry instead of the transcoder dropping it.
--   * Speech with `voice` as an object (a custom voice id, in OpenAI's spec) is
--     answered 400 saying so (OBJECT_REFUSALS).
--   * OpenAI's chat requests get `x-aigne-rest: 1`: the server then prints the
--     string fields OpenAI sends as null as null (server/api/convert.py).
--   * The POSTs of OpenAI's operations (OPENAI_BODIES) get `x-aigne-answer-headers:
--     trailers`: the server then sends a unary answer's own headers (x-aigne-hub-*,
--     x-ratelimit-*) as gRPC trailers only, not also ahead of the answer (a grpc batch
--     less per call), and this filter copies them into the response's headers.
--   * A client-sent `x-aigne-fields`, `x-aigne-rest`, `x-aigne-answer-headers` or
--     `x-aigne-original-path` header is removed, and a
--     client-sent `x-aigne-bridge` is replaced by `x-aigne-bridge: rest`: the server
--     knows the request came through this bridge.
--   * Every other request passes untouched after a few header operations.
-- Responses:
--   * OpenAI's chat answers (BridgeService): untouched unless an error status, but for
--     the headers copied from the trailers (above).
--   * OpenAI-shaped answers (/models and /status, marked on the request): members the
--     transcoder prints only because proto3 has no "unset" for
--     them are dropped (TRIMS): `"tool_calls":[]`, `"alias_of":""`, `"error":""`,
--     `"code":""`, `"resting":[]` (/status); and an empty `"param"` becomes OpenAI's null (`created` stays, even
--     0: OpenAI's schemas require it). OpenAI
--     prints none of them; clients that test `tool_calls is not None` took every answer
--     for a tool turn. Every pattern starts or ends with a quote outside any string (a
--     quote inside a JSON string is escaped), so none can match inside a value. (The
--     server prints chat answers by the same rules: server/api/rest_print.py.)
--   * status >= 400 with a JSON google.rpc.Status body (the transcoder's
--     convert_grpc_status): an OpenAI `error` object is added in front of the original
--     fields. Its type, code and param are copied from the status's ErrorInfo (metadata
--     `openai_type`, reason, metadata `field`): the server's error tree decides them
--     (server/api/errors.py); this filter keeps no table of its own. A status without
--     them (not from the gateway) is "api_error". Envoy's own error replies are shaped
--     by local_reply_config instead.

local find, sub, byte, gsub = string.find, string.sub, string.byte, string.gsub

-- BridgeService's internal bindings: OpenAI's chat answers as the server prints them.
local PRINTED_PATH = "/internal/openai/chat/completions"
local PRINTED_STREAM_PATH = "/internal/openai/chat/completions:stream"
-- AIGNE Hub's agent protocol (AgentService): its chat path and internal stream binding.
local AGENT_CHAT_PATH = "/api/v2/chat"
local AGENT_STREAM_PATH = "/internal/api/v2/chat:stream"
local LUA_NS = "envoy.filters.http.lua"
local CHAT_PATHS = { ["/chat/completions"] = true, ["/v1/chat/completions"] = true }
-- The JSON bodies of OpenAI's API whose top-level members are reported to the server
-- (`x-aigne-fields`), which refuses those it does not carry (server/api/convert.py).
local OPENAI_BODIES = {
  ["/chat/completions"] = true, ["/v1/chat/completions"] = true,
  ["/embeddings"] = true, ["/v1/embeddings"] = true,
  ["/images/generations"] = true, ["/v1/images/generations"] = true,
  ["/image/generations"] = true, ["/v1/image/generations"] = true,
  ["/audio/speech"] = true, ["/v1/audio/speech"] = true,
}

-- Position of the closing quote of the JSON string whose opening quote is at `i`, or nil.
-- Plain find of one character is a memchr, far faster than a pattern class over long
-- strings (base64 images); a quote preceded by an odd number of backslashes is escaped.
local function string_end(s, i)
  local j = i + 1
  while true do
    local k = find(s, '"', j, true)
    if not k then return nil end
    local b = k - 1
    while byte(s, b) == 92 do b = b - 1 end
    if (k - 1 - b) % 2 == 0 then return k end
    j = k + 1
  end
end

-- Where the value of member `key` of the JSON object that opens at `open` starts (its
-- first non-blank byte), or nil. Strings and nested values are skipped structurally,
-- so a `key` inside a message or a nested object never counts; each step is one
-- C-level string.find. The scan stops at the first such member (the transcoder rejects
-- a duplicate key with 400 anyway).
local function member_value(s, open, key)
  if not open or byte(s, open) ~= 123 then return nil end -- not an object
  local pos = open + 1
  local depth = 1
  while true do
    local i, _, c = find(s, '([{}%[%]"])', pos)
    if not i then return nil end
    if c == '"' then
      local j = string_end(s, i)
      if not j then return nil end
      pos = j + 1
      if depth == 1 and j - i - 1 == #key and sub(s, i + 1, j - 1) == key then
        local _, e = find(s, "^[ \t\r\n]*:[ \t\r\n]*", pos)
        if e then return e + 1 end
      end
    elseif c == "{" or c == "[" then
      depth = depth + 1
      pos = i + 1
    else
      depth = depth - 1
      if depth == 0 then return nil end
      pos = i + 1
    end
  end
end

-- Empty members to drop: each as the member after a comma, as the first of several
-- and as the only one. A member's patterns run only when a plain search finds it: most
-- answers hold none of them, and 16 pattern passes over every answer were most of the
-- filter's work on /status.
local TRIMS = {}
for _, member in ipairs({
  { '"tool_calls":[]', '"tool_calls":%[%]' }, { '"alias_of":""', '"alias_of":""' }, { '"error":""', '"error":""' },
  { '"code":""', '"code":""' }, { '"resting":[]', '"resting":%[%]' },
}) do
  local plain, pattern = member[1], member[2]
  TRIMS[#TRIMS + 1] = {
    plain, { { "," .. pattern, "" }, { "{" .. pattern .. ",", "{" }, { "{" .. pattern .. "}", "{}" } },
  }
end
TRIMS[#TRIMS + 1] = { '"param":""', { { '"param":""', '"param":null' } } }
local TRIM_PATHS = {
  ["/models"] = true, ["/v1/models"] = true, ["/status"] = true, ["/v1/status"] = true,
}

local function trim_empty(s)
  for _, trim in ipairs(TRIMS) do
    if find(s, trim[1], 1, true) then
      for _, rule in ipairs(trim[2]) do
        s = gsub(s, rule[1], rule[2])
      end
    end
  end
  return s
end

local function first_byte(s)
  return find(s, "[^ \t\r\n]")
end

-- Whether `s`, a JSON object, has "options": {"streaming": true} (AIGNE's agent calls).
local function agent_streaming_true(s)
  local options = member_value(s, first_byte(s), "options")
  local streaming = options and member_value(s, options, "streaming")
  return streaming ~= nil and sub(s, streaming, streaming + 3) == "true"
end

-- The top-level members of `s`, a JSON object, in order: each `{name = raw key, value
-- = the first 5 bytes of its value}`; nil when `s` is not an object. Strings and nested
-- values are skipped structurally, so a key inside a message or a nested object never
-- counts; each step is one C-level string.find. At depth 1 a string followed by ":" is
-- a key (a string value is followed by "," or "}"). At most MAX_MEMBERS are listed,
-- then one named TOO_MANY (no body of OpenAI's API has that many parameters).
local MAX_MEMBERS = 64
local TOO_MANY = "+"

local function top_level_members(s)
  local pos = find(s, "[^ \t\r\n]")
  if not pos or byte(s, pos) ~= 123 then return nil end -- not an object
  pos = pos + 1
  local depth, members = 1, {}
  while true do
    local i, _, c = find(s, '([{}%[%]"])', pos)
    if not i then return members end
    if c == '"' then
      local j = string_end(s, i)
      if not j then return members end
      pos = j + 1
      if depth == 1 then
        local _, e = find(s, "^[ \t\r\n]*:[ \t\r\n]*", pos)
        if e then
          if #members == MAX_MEMBERS then
            members[#members + 1] = { name = TOO_MANY, value = "" }
            return members
          end
          members[#members + 1] = { name = sub(s, i + 1, j - 1), value = sub(s, e + 1, e + 5) }
          pos = e + 1
        end
      end
    elseif c == "{" or c == "[" then
      depth = depth + 1
      pos = i + 1
    else
      depth = depth - 1
      if depth == 0 then return members end
      pos = i + 1
    end
  end
end

-- Whether the first top-level "stream" member is true (the transcoder rejects a
-- duplicate key with 400 anyway).
local function stream_true(members)
  for _, member in ipairs(members) do
    if member.name == "stream" then return sub(member.value, 1, 4) == "true" end
  end
  return false
end

-- The `x-aigne-fields` header: the top-level members the client gave a value, comma
-- separated. A null or false value is what leaving the member out means (OpenAI's
-- boolean parameters all default to false), so those are not listed. A name that is
-- not a plain identifier is listed as "?" (a header carries no arbitrary bytes).
local function given_fields(members)
  local names = {}
  for _, member in ipairs(members) do
    local v = member.value
    if sub(v, 1, 4) ~= "null" and v ~= "false" then
      local name = member.name
      if name ~= TOO_MANY and (#name > 64 or find(name, "[^%w_%.%-]")) then name = "?" end
      names[#names + 1] = name
    end
  end
  return table.concat(names, ",")
end

-- Members that OpenAI's spec allows as an object where the contract has a string:
-- the transcoder would answer its raw "Starting an object on a scalar field".
local OBJECT_REFUSALS = {
  voice = 'voice: a custom voice given as an object ({"id": ...}) is not supported by the ' ..
    'gateway; give a voice name such as "alloy"',
}
local SPEECH_PATHS = { ["/audio/speech"] = true, ["/v1/audio/speech"] = true }

-- The message refusing an object-valued member of `path`'s body, or nil.
local function object_refusal(path, members)
  if not SPEECH_PATHS[path] then return nil end
  for _, member in ipairs(members) do
    if sub(member.value, 1, 1) == "{" and OBJECT_REFUSALS[member.name] then
      return OBJECT_REFUSALS[member.name]
    end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path")
  if not path then return end
  headers:remove("x-aigne-original-path") -- only this filter sets it (the access log's path)
  local ctype = headers:get("content-type")
  if ctype and sub(ctype, 1, 16) == "application/grpc" then
    -- Native gRPC belongs on the gRPC port: its route answers 404, which Envoy turns
    -- into gRPC status UNIMPLEMENTED; this marker selects the local_reply_config mapper
    -- whose text (naming the gRPC port) becomes the grpc-message. The content-type
    -- cannot select it: the transcoder gives every REST request that content-type too.
    headers:replace("x-aigne-bridge", "grpc")
    return
  end
  -- Only this filter sets the marker (a client's own is replaced): "rest" tells the
  -- server the answer is printed as OpenAI JSON (e.g. embeddings as a JSON `embedding`
  -- rather than gRPC's typed `vector`); the stream rewrite below makes it "sse".
  headers:replace("x-aigne-bridge", "rest")
  headers:remove("x-aigne-fields")
  headers:remove("x-aigne-rest")
  headers:remove("x-aigne-answer-headers")
  local query = ""
  local q = find(path, "?", 1, true)
  if q then
    query = sub(path, q)
    path = sub(path, 1, q - 1)
  end

  if TRIM_PATHS[path] then
    handle:streamInfo():dynamicMetadata():set(LUA_NS, "trim", true)
  end
  if OPENAI_BODIES[path] then
    if headers:get(":method") ~= "POST" then return end
    -- (A stream's headers go ahead of it: the server ignores this marker there.)
    headers:replace("x-aigne-answer-headers", "trailers")
    handle:streamInfo():dynamicMetadata():set(LUA_NS, "answer_headers", true)
    local chat = CHAT_PATHS[path]
    if chat then
      -- The server prints the answer (nulls included) for OpenAI's clients. The access
      -- log shows the client's path (x-aigne-original-path; see envoy.yaml).
      headers:replace("x-aigne-rest", "1")
      headers:replace("x-aigne-original-path", path .. query)
      headers:replace(":path", PRINTED_PATH .. query)
    end
    local body = handle:body()
    if not body or body:length() == 0 then return end
    local members = top_level_members(body:getBytes(0, body:length()))
    if not members then return end -- not an object: the transcoder answers 400
    local refusal = object_refusal(path, members)
    if refusal then
      -- Shaped as an OpenAI error by local_reply_config (400 mapper).
      handle:respond({ [":status"] = "400" }, refusal)
      return
    end
    -- A header map wrapper taken before body() is dead after it: take a new one.
    headers = handle:headers()
    headers:replace("x-aigne-fields", given_fields(members))
    if chat and stream_true(members) then
      headers:replace(":path", PRINTED_STREAM_PATH .. query)
      headers:replace("x-aigne-bridge", "sse")
    end
    return
  end

  if sub(path, 1, 5) == "/api/" or path == "/__blocklet__.js" then
    -- AIGNE's protocol: its errors get AIGNE Hub's shape on the way back.
    handle:streamInfo():dynamicMetadata():set(LUA_NS, "agent", true)
    if path == AGENT_CHAT_PATH and headers:get(":method") == "POST" then
      local body = handle:body()
      if not body or body:length() < 20 then return end
      local text = body:getBytes(0, body:length())
      if find(text, '"streaming"', 1, true) and agent_streaming_true(text) then
        headers = handle:headers()
        headers:replace(":path", AGENT_STREAM_PATH .. query)
        headers:replace("x-aigne-bridge", "sse")
      end
    end
    return
  end

  if sub(path, 1, 10) == "/internal/" or path == "/internal" then
    -- Shaped as an OpenAI error by local_reply_config (404 mapper).
    handle:respond({ [":status"] = "404" }, "Not Found")
  end
end

local function json_escape(s)
  return (gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\r" then return "\\r" end
    if c == "\t" then return "\\t" end
    return string.format("\\u%04x", byte(c))
  end))
end

-- The raw (still escaped) text of the JSON string value that starts right after the
-- `key` pattern found at or after `init` and before `limit`, or nil.
local function raw_string_after(s, key, init, limit)
  local _, e = find(s, key, init, true)
  if not e or (limit and e > limit) then return nil end
  local close = string_end(s, e)
  if not close then return nil end
  return sub(s, e + 1, close - 1)
end

-- Envoy's own error replies can quote the client's values (the transcoder's "n: invalid
-- value ..." quotes the whole value): keep at most MAX_ECHO bytes of the message.
local MAX_ECHO = 300

-- The longest prefix of the escaped JSON string `s` of at most `n` bytes that ends
-- neither inside an escape sequence nor inside a UTF-8 character.
local function json_prefix(s, n)
  local i = n
  while i > 0 and byte(s, i + 1) and byte(s, i + 1) >= 0x80 and byte(s, i + 1) < 0xC0 do i = i - 1 end
  -- An escape starts at the last backslash of an odd run; cut before it if incomplete.
  local k = i
  while k > 0 and byte(s, k) ~= 92 and i - k < 6 do k = k - 1 end
  if k > 0 and byte(s, k) == 92 then
    local b = k
    while b > 1 and byte(s, b - 1) == 92 do b = b - 1 end
    local run = k - b + 1
    local escape_start = (run % 2 == 1) and k or nil
    if escape_start then
      local needed = byte(s, escape_start + 1) == 117 and 6 or 2 -- \uXXXX or \x
      if i - escape_start + 1 < needed then i = escape_start - 1 end
    end
  end
  return sub(s, 1, i)
end

local function bound_message(body, text)
  local _, open = find(text, '"message":"', 1, true)
  if not open then return end
  local close = string_end(text, open)
  if not close or close - open - 1 <= MAX_ECHO then return end
  local message = json_prefix(sub(text, open + 1, close - 1), MAX_ECHO) .. "..."
  body:setBytes(sub(text, 1, open) .. message .. sub(text, close))
end

-- Position of the "}" closing the flat JSON object of strings whose "{" is at `i`.
local function object_end(s, i)
  local j = i + 1
  while true do
    local k = find(s, '[}"]', j)
    if not k or byte(s, k) == 125 then return k end
    local close = string_end(s, k)
    if not close then return nil end
    j = close + 1
  end
end

-- AIGNE Hub's error type for a reason: running out of credits is NOT_ENOUGH (and 402).
local function agent_type(reason, fallback)
  if reason == "INSUFFICIENT_CREDITS" then return "NOT_ENOUGH" end
  return reason or fallback
end

local function rewrite_error(handle, status, agent)
  local body = handle:body()
  if not body then return end
  local n = body:length()
  local text = n > 0 and body:getBytes(0, n) or ""
  if sub(text, 1, 10) == '{"error":{' then -- already OpenAI-shaped: Envoy's own reply
    bound_message(body, text)
    return
  end
  local etype = "api_error"

  if sub(text, 1, 8) == '{"code":' then
    -- google.rpc.Status as printed by the transcoder: code, message, details, in order.
    local details_at = find(text, ',"details":', 1, true)
    local message = raw_string_after(text, '"message":"', 1, details_at) or ""
    local code, param, reason = "null", "null", nil
    local info = details_at and find(text, '"@type":"type.googleapis.com/google.rpc.ErrorInfo"', details_at, true)
    if info then
      -- Search only this detail: up to the next "@type" (ErrorInfo has no nested Any).
      local limit = find(text, '"@type":', info + 8, true)
      reason = raw_string_after(text, '"reason":"', info, limit)
      if reason == "" then reason = nil end
      if reason then code = '"' .. reason .. '"' end
      local meta = find(text, '"metadata":{', info, true)
      if meta and (not limit or meta < limit) then
        -- Values are JSON strings: a quote inside one is escaped, so neither a key
        -- pattern nor the closing brace can match inside a value.
        local meta_end = object_end(text, meta + 11)
        local field = raw_string_after(text, '"field":"', meta, meta_end)
        if field and field ~= "" then param = '"' .. field .. '"' end
        local openai_type = raw_string_after(text, '"openai_type":"', meta, meta_end)
        if openai_type and openai_type ~= "" then etype = openai_type end
      end
    end
    if agent then
      -- AIGNE Hub's shape: the client shows `message` and keeps `type`.
      body:setBytes('{"error":{"message":"' .. message .. '","type":"' .. agent_type(reason, etype) ..
        '","code":' .. code .. "}," .. sub(text, 2))
      if reason == "INSUFFICIENT_CREDITS" then handle:headers():replace(":status", "402") end
    else
      body:setBytes('{"error":{"message":"' .. message .. '","type":"' .. etype ..
        '","param":' .. param .. ',"code":' .. code .. "}," .. sub(text, 2))
    end
  else
    -- Anything else (plain text from an upstream, an empty body): wrap it.
    local message = text ~= "" and text or ("HTTP " .. status)
    body:setBytes('{"error":{"message":"' .. json_escape(message) .. '","type":"' .. etype ..
      '","param":null,"code":null}}')
  end
  handle:headers():replace("content-type", "application/json")
end

-- An agent stream's failure event `data: {"error":{...}}` becomes AIGNE's
-- `event: error` with the error object as its data, chunk by chunk.
local AGENT_ERROR = 'data: {"error":'

local function rewrite_agent_stream(handle)
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n >= #AGENT_ERROR then
      local data = chunk:getBytes(0, n)
      local i = find(data, AGENT_ERROR, 1, true)
      local j = i and find(data, "\n\n", i, true)
      if j then
        chunk:setBytes(sub(data, 1, i - 1) .. "event: error\ndata: " .. sub(data, i + #AGENT_ERROR, j - 2) ..
          "\n\n" .. sub(data, j + 2))
      end
    end
  end
end

-- A unary answer's own headers, sent by the server as gRPC trailers only (see the
-- request's `x-aigne-answer-headers`): copied into the response's headers. body()
-- first: it holds the headers until the answer's end (the trailers); trailers() alone
-- would let the body, and the headers with it, go on while it waits.
local function headers_from_trailers(handle)
  handle:body()
  local trailers = handle:trailers()
  if not trailers then return end
  local headers = handle:headers()
  for name, value in pairs(trailers) do
    local prefix = sub(name, 1, 12)
    if prefix == "x-aigne-hub-" or prefix == "x-ratelimit-" then
      headers:add(name, value)
    end
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 0
  local meta = handle:streamInfo():dynamicMetadata():get(LUA_NS)
  local agent = meta ~= nil and meta["agent"] == true
  if status >= 400 then
    rewrite_error(handle, status, agent)
    return
  end
  local ctype = headers:get("content-type")
  if meta ~= nil and meta["answer_headers"] == true and not (ctype and sub(ctype, 1, 17) == "text/event-stream") then
    headers_from_trailers(handle)
  end
  if not ctype then return end
  if sub(ctype, 1, 16) == "application/json" then
    if meta == nil or meta["trim"] ~= true then return end
    local body = handle:body()
    if not body or body:length() == 0 then return end
    local text = body:getBytes(0, body:length())
    local out = trim_empty(text)
    if out ~= text then body:setBytes(out) end
    return
  end
  -- OpenAI's chat streams arrive printed by the server: only AIGNE's are rewritten.
  if agent and sub(ctype, 1, 17) == "text/event-stream" then
    rewrite_agent_stream(handle)
  end
end
