#!/usr/bin/env node
// Reference runtime for faceshield's PyTorch TF.js graph executor: runs a TF.js graph model (model.json + .bin
// weights read from disk) with the official TF.js 4.22.0 converter on the pure-JS CPU backend, and writes the
// requested outputs.
//
// Usage: node run_graph.js REQUEST.json
//
// REQUEST.json:
//   {
//     "model": "/path/to/model.json",            weights are read from the paths in its weightsManifest, beside it,
//     "weights": {"model.bin": "/path/model.bin"}, optional: where a shard is when not beside model.json
//     "input": {"file": "/path/x.f32", "shape": [B, H, W, C]},   raw float32 little-endian, row-major (NHWC)
//     "input_name": "img_inputs",                optional: feed by name; default: the model's single input
//     "outputs": ["embeddings", "Identity_1:0"], node names (":0" optional)
//     "out_dir": "/path/out",
//     "preprocess": [...]                        optional TF.js ops applied to the input first, in order, to
//   }                                            replay a Human pre-processing exactly:
//       {"op": "resizeBilinear", "size": [h, w]}   tf.image.resizeBilinear(x, size, false) (Human's call)
//       {"op": "mul" | "sub", "value": v}          v a number or an array broadcast on the last axis
//       {"op": "sum", "axis": a, "keepDims": true}
//
// Writes out_dir/output_<i>.f32 (raw float32 little-endian, row-major) and out_dir/result.json:
//   {"outputs": [{"name": ..., "shape": [...], "file": "output_<i>.f32"}], "backend": "cpu", "tfjs": "4.22.0"}

'use strict';

const fs = require('fs');
const path = require('path');
const tf = require('@tensorflow/tfjs-core');
require('@tensorflow/tfjs-backend-cpu');
const tfconv = require('@tensorflow/tfjs-converter');

function readModelArtifacts(modelPath, weightFiles) {
  const json = JSON.parse(fs.readFileSync(modelPath, 'utf8'));
  const dir = path.dirname(modelPath);
  const weightSpecs = [];
  const buffers = [];
  for (const group of json.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) buffers.push(fs.readFileSync((weightFiles && weightFiles[p]) || path.join(dir, p)));
  }
  const all = Buffer.concat(buffers);
  // Copy into a fresh ArrayBuffer: a Node Buffer may be a view into a larger shared pool.
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
  return {
    modelTopology: json.modelTopology,
    format: json.format,
    generatedBy: json.generatedBy,
    convertedBy: json.convertedBy,
    signature: json.signature,
    userDefinedMetadata: json.userDefinedMetadata,
    weightSpecs,
    weightData,
  };
}

function readFloat32(file, shape) {
  const buf = fs.readFileSync(file);
  const n = shape.reduce((a, b) => a * b, 1);
  if (buf.byteLength !== 4 * n) throw new Error(`${file}: ${buf.byteLength} bytes, expected ${4 * n} for shape [${shape}]`);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = buf.readFloatLE(4 * i);
  return tf.tensor(data, shape, 'float32');
}

function preprocess(x, steps) {
  for (const step of steps || []) {
    if (step.op === 'resizeBilinear') x = tf.image.resizeBilinear(x, step.size, false);
    else if (step.op === 'mul') x = tf.mul(x, tf.tensor(step.value, undefined, 'float32'));
    else if (step.op === 'sub') x = tf.sub(x, tf.tensor(step.value, undefined, 'float32'));
    else if (step.op === 'sum') x = tf.sum(x, step.axis, !!step.keepDims);
    else throw new Error(`unknown preprocess op ${JSON.stringify(step)}`);
  }
  return x;
}

function writeFloat32(file, values) {
  const buf = Buffer.alloc(4 * values.length);
  for (let i = 0; i < values.length; i++) buf.writeFloatLE(values[i], 4 * i);
  fs.writeFileSync(file, buf);
}

async function main() {
  if (process.argv.length !== 3) {
    process.stderr.write('usage: node run_graph.js REQUEST.json\n');
    process.exit(2);
  }
  const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  await tf.setBackend('cpu');
  await tf.ready();
  const artifacts = readModelArtifacts(request.model, request.weights);
  const handler = { load: async () => artifacts };
  const model = await tfconv.loadGraphModel(handler);
  const x = preprocess(readFloat32(request.input.file, request.input.shape), request.preprocess);
  const feed = request.input_name ? { [request.input_name]: x } : x;
  let results = model.execute(feed, request.outputs);
  if (!Array.isArray(results)) results = [results];
  fs.mkdirSync(request.out_dir, { recursive: true });
  const outputs = [];
  for (let i = 0; i < results.length; i++) {
    const file = `output_${i}.f32`;
    writeFloat32(path.join(request.out_dir, file), await results[i].data());
    outputs.push({ name: request.outputs[i], shape: results[i].shape, file });
  }
  fs.writeFileSync(
    path.join(request.out_dir, 'result.json'),
    JSON.stringify({ outputs, backend: tf.getBackend(), tfjs: tf.version_core }, null, 2),
  );
}

main().catch((err) => {
  process.stderr.write(`run_graph.js: ${err.stack || err}\n`);
  process.exit(1);
});
