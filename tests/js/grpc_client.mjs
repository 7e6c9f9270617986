// A grpc-js (Node.js) subscriber for the gRPC tests: an independent HTTP/2 and
// gRPC implementation, as browsers' back ends and React Native apps use.
//
//   node grpc_client.mjs PORT TOPICS [--ca FILE] [--last-event-id ID] [--count N]
//
// Sends one Request (TOPICS comma-separated), prints {"ready":true} once the
// call is open, then one JSON line per Payload ({"type","data","id"}); after
// --count payloads it sends forceClose. Prints {"status":CODE,"details":...}
// when the call ends, then exits.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const [port, topics] = args;
const option = (name) => {
  const at = args.indexOf(name);
  return at >= 0 ? args[at + 1] : undefined;
};
const definition = protoLoader.loadSync(join(here, "..", "..", "proto", "stream.proto"), {
  keepCase: true,
  defaults: true,
});
const proto = grpc.loadPackageDefinition(definition).proto;
const ca = option("--ca");
const credentials = ca
  ? grpc.credentials.createSsl(readFileSync(ca))
  : grpc.credentials.createInsecure();
const client = new proto.StreamService(`localhost:${port}`, credentials);
const count = Number(option("--count") ?? "0");
const call = client.Events();
let received = 0;
const print = (value) => process.stdout.write(JSON.stringify(value) + "\n");

call.on("metadata", () => print({ ready: true }));
call.on("data", (payload) => {
  print({ type: payload.eventType?.type ?? "", data: payload.data, id: payload.id });
  received += 1;
  if (count && received === count) {
    call.write({ events: [], forceClose: true, lastEventId: "" });
  }
});
call.on("status", (status) => {
  print({ status: status.code, details: status.details });
  client.close();
});
call.on("error", () => {}); // reported by "status"
call.write({
  events: topics.split(",").map((type) => ({ type })),
  forceClose: false,
  lastEventId: option("--last-event-id") ?? "",
});
