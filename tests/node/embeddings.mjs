// The Node `openai` SDK with its defaults (encoding_format "base64", decoded by the SDK
// itself) against the gateway; prints what the SDK returned as JSON on stdout.
// Usage: node embeddings.mjs BASE_URL TOKEN MODEL INPUT
import OpenAI from "openai";

const [baseURL, apiKey, model, input] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 10000 });
const answer = await client.embeddings.create({ model, input });
const chat = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Hello" }],
});
process.stdout.write(
  JSON.stringify({
    embedding: answer.data[0].embedding,
    model: answer.model,
    chatModel: chat.model,
    chatText: chat.choices[0].message.content,
  }),
);
