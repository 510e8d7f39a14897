// Keep-alive POSTs through an HTTP proxy with undici's ProxyAgent, for bench/bench_clients.py.
//
//   node undici_client.js PROXY_URL URL JSON_BODY COUNT      (undici found through NODE_PATH)
//
// Prints one line per request: the milliseconds it took and its X-Cache header.
const { ProxyAgent, request } = require("undici");

async function main() {
  const [proxyUrl, url, body, count] = process.argv.slice(2);
  const agent = new ProxyAgent(proxyUrl);
  for (let i = 0; i < Number(count); i++) {
    const started = process.hrtime.bigint();
    const response = await request(url, {
      method: "POST",
      body,
      headers: { "content-type": "application/json" },
      dispatcher: agent,
    });
    await response.body.arrayBuffer();
    const took = Number(process.hrtime.bigint() - started) / 1e6;
    console.log(`${took} ${response.headers["x-cache"] || "-"}`);
  }
  await agent.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
