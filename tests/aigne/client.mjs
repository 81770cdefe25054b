// AIGNE's own hub client (@aigne/aigne-hub, pinned in package-lock.json), unchanged,
// against the gateway's REST port: what an AIGNE framework or `aigne` CLI user runs.
//
//   node tests/aigne/client.mjs BASE_URL API_KEY SCENARIO...
//
// Prints one JSON object: for each scenario, {ok: true, output} or {ok: false, error,
// type}. The base URL also goes into AIGNE_HUB_API_URL, where the client's static
// model list looks for it.
import { AIGNEHubChatModel, AIGNEHubImageModel } from "@aigne/aigne-hub";

const [baseURL, apiKey, ...scenarios] = process.argv.slice(2);
process.env.AIGNE_HUB_API_URL = baseURL;
// The provider behind the chat scenarios, and its ordinary chat model.
const PROVIDER = process.env.AIGNE_TEST_PROVIDER || "openai";
const CHAT_MODEL = `aignehub/${PROVIDER}/${process.env.AIGNE_TEST_CHAT_MODEL || "gpt-4o-mini"}`;
const TOOLS_MODEL = `aignehub/${PROVIDER}/tools`;

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
    },
  },
};

const chat = (model, key = apiKey) => new AIGNEHubChatModel({ baseURL, apiKey: key, model });
const hello = { messages: [{ role: "user", content: "hello from aigne" }] };

async function collect(stream) {
  const events = [];
  let last = {};
  for await (const chunk of stream) {
    events.push(chunk);
    if (chunk.delta?.json) last = chunk.delta.json;
  }
  return { events: events.length, textEvents: events.filter((e) => e.delta?.text?.text).length, output: last };
}

const SCENARIOS = {
  invoke: () => chat(CHAT_MODEL).invoke(hello),
  stream: async () => collect(await chat(CHAT_MODEL).invoke(hello, { streaming: true })),
  tools: async () => {
    const model = chat(TOOLS_MODEL);
    const first = await model.invoke({ ...hello, tools: [WEATHER_TOOL], toolChoice: "auto" });
    const call = first.toolCalls[0];
    const second = await model.invoke({
      messages: [
        ...hello.messages,
        { role: "agent", toolCalls: first.toolCalls },
        { role: "tool", toolCallId: call.id, content: JSON.stringify({ sky: "sunny" }) },
      ],
      tools: [WEATHER_TOOL],
    });
    return { first, second };
  },
  toolsStream: async () =>
    collect(await chat(TOOLS_MODEL).invoke({ ...hello, tools: [WEATHER_TOOL] }, { streaming: true })),
  structured: () =>
    chat(CHAT_MODEL).invoke({
      ...hello,
      responseFormat: {
        type: "json_schema",
        jsonSchema: {
          name: "echo",
          schema: { type: "object", properties: { echo: { type: "string" } }, required: ["echo"] },
        },
      },
    }),
  image: () =>
    new AIGNEHubImageModel({ baseURL, apiKey, model: "aignehub/openai/dall-e-3" }).invoke({ prompt: "a red cat" }),
  gptImage: () =>
    new AIGNEHubImageModel({ baseURL, apiKey, model: "aignehub/openai/gpt-image-1" }).invoke({ prompt: "a red cat" }),
  models: async () => ({
    chat: await AIGNEHubChatModel.models(),
    image: await AIGNEHubImageModel.models(),
  }),
  badKey: () => chat(CHAT_MODEL, "ahk_notakey_000").invoke(hello),
  unknownModel: () => chat("aignehub/nosuch/model").invoke(hello),
  streamError: async () => collect(await chat("aignehub/openai/stream-error").invoke(hello, { streaming: true })),
  upstreamError: () => chat("aignehub/openai/error-400").invoke(hello),
  bareName: () => chat("openai/gpt-4o-mini").invoke(hello),
};

const results = {};
for (const name of scenarios) {
  try {
    results[name] = { ok: true, output: await SCENARIOS[name]() };
  } catch (error) {
    results[name] = { ok: false, error: error.message, type: error.type ?? null };
  }
}
process.stdout.write(JSON.stringify(results));
