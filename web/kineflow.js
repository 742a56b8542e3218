// KineFlow frontend extensions for ComfyUI's canvas.
//
// KineFlow.VideoLatentSizes: HunyuanVideo latents need frame counts of the form 4k+1 (the causal VAE compresses 4
// frames into one latent frame after the first) and sizes that are multiples of 16, while AnimateDiff (sd15)
// latents take any frame count. The frames widget therefore has step 1, and this extension snaps it to 4k+1 only
// when the node's latent_format is hunyuan_video; it also shows the resulting latent shape under the node.
//
// KineFlow.SamplerPreview: while a Sampler runs, the server (runtime/host.py) sends a "kineflow.preview" message
// after each step with the current estimate of the video, its frames side by side in one PNG
// (runtime/previews.py). The Sampler node plays them in a loop below its widgets, and keeps the last preview.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FRAME_WIDGETS = new Set(["frames", "length", "num_frames"]);
const SIZE_WIDGETS = new Set(["width", "height"]);
const SNAP_NODES = new Set(["KineFlowEmptyVideoLatent"]);

function snapFrames(value) {
  const v = Math.max(1, Math.round(Number(value) || 1));
  return Math.round((v - 1) / 4) * 4 + 1;
}

function snapSize(value) {
  const v = Math.max(16, Math.round(Number(value) || 16));
  return Math.round(v / 16) * 16;
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

// Only the causal 3D VAE (hunyuan_video latents) needs 4k+1 frames; sd15 latents are one per frame.
function isCausalVideoLatent(node) {
  return (widgetValue(node, "latent_format") ?? "hunyuan_video") === "hunyuan_video";
}

function describe(node) {
  const frames = widgetValue(node, "frames");
  const width = widgetValue(node, "width");
  const height = widgetValue(node, "height");
  if (frames === undefined || width === undefined || height === undefined) return "";
  const latentFrames = isCausalVideoLatent(node) ? Math.floor((frames - 1) / 4) + 1 : frames;
  return `${frames} frames -> latent ${latentFrames}x${height / 8}x${width / 8}`;
}

app.registerExtension({
  name: "KineFlow.VideoLatentSizes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SNAP_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      for (const widget of this.widgets ?? []) {
        const isFrames = FRAME_WIDGETS.has(widget.name);
        if (!isFrames && !SIZE_WIDGETS.has(widget.name)) continue;
        const node = this;
        const original = widget.callback;
        widget.callback = function (value, ...rest) {
          if (!isFrames) widget.value = snapSize(value);
          else if (isCausalVideoLatent(node)) widget.value = snapFrames(value);
          return original?.call(this, widget.value, ...rest);
        };
      }
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.flags?.collapsed) return;
      const text = describe(this);
      if (!text) return;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#8a8";
      ctx.fillText(text, 10, this.size[1] - 6);
      ctx.restore();
    };
  },
});

const PREVIEW_EVENT = "kineflow.preview";
const PREVIEW_NODES = new Set(["KineFlowSampler"]);
const PREVIEW_MARGIN = 10;
const PREVIEW_MAX_HEIGHT = 320; // node pixels made room for when a preview first arrives

const playing = new Set(); // nodes showing a preview
let redrawTimer = null;
let previewsReceived = 0;

// A node by the id ComfyUI executes it under: "5", or "12:5" for node 5 inside the subgraph node 12.
function nodeByExecutionId(id) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(part) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

// Where the preview goes: below the node's widgets, across its width.
function previewArea(node) {
  const top = node.computeSize()[1];
  return [PREVIEW_MARGIN, top, node.size[0] - 2 * PREVIEW_MARGIN, node.size[1] - top - PREVIEW_MARGIN];
}

function makeRoom(node) {
  const { width, height } = node.kineflowPreview;
  const [, top, areaWidth] = previewArea(node);
  const wanted = top + Math.min(PREVIEW_MAX_HEIGHT, (areaWidth * height) / width) + PREVIEW_MARGIN;
  if (node.size[1] < wanted) node.setSize([node.size[0], wanted]);
}

async function showPreview(message) {
  const node = nodeByExecutionId(message.node);
  if (!node || !PREVIEW_NODES.has(node.comfyClass ?? node.type)) return;
  const order = ++previewsReceived;
  node.kineflowPreviewOrder = order;
  const strip = new Image();
  strip.src = message.image;
  await strip.decode();
  // One bitmap per frame: drawing sub-rectangles of the strip would blend the edges of neighbouring frames.
  const frames = await Promise.all(Array.from({ length: message.frames }, (_, i) =>
    createImageBitmap(strip, i * message.width, 0, message.width, message.height)));
  if (node.kineflowPreviewOrder !== order) return; // a newer preview arrived meanwhile
  const previous = node.kineflowPreview;
  previous?.frames.forEach((frame) => frame.close());
  node.kineflowPreview = {
    frames, width: message.width, height: message.height, frameMs: message.frame_ms,
    // The clock runs on across updates: every step's preview continues the loop where the last one was.
    start: previous?.start ?? performance.now(),
    rect: null, // where the last frame was drawn, in node coordinates
  };
  makeRoom(node);
  playing.add(node);
  app.canvas?.setDirty(true, false);
  scheduleRedraw();
}

function drawPreview(node, ctx) {
  const preview = node.kineflowPreview;
  if (!preview || node.flags?.collapsed) return;
  const [left, top, width, height] = previewArea(node);
  if (width <= 0 || height <= 0) return;
  const scale = Math.min(width / preview.width, height / preview.height);
  const w = preview.width * scale;
  const h = preview.height * scale;
  const x = left + (width - w) / 2;
  const y = top + (height - h) / 2;
  const index = Math.floor((performance.now() - preview.start) / preview.frameMs) % preview.frames.length;
  ctx.drawImage(preview.frames[index], x, y, w, h);
  preview.rect = [x, y, w, h];
}

// Redraw the canvas when the next frame is due, while any node on it plays a preview.
function scheduleRedraw() {
  if (redrawTimer) return;
  for (const node of playing) if (!node.graph || !node.kineflowPreview) playing.delete(node);
  if (!playing.size) return;
  const delay = Math.min(...[...playing].map((node) => node.kineflowPreview.frameMs));
  redrawTimer = setTimeout(() => {
    redrawTimer = null;
    app.canvas?.setDirty(true, false);
    scheduleRedraw();
  }, delay);
}

app.registerExtension({
  name: "KineFlow.SamplerPreview",
  setup() {
    api.addEventListener(PREVIEW_EVENT, ({ detail }) =>
      showPreview(detail).catch((error) => console.warn("KineFlow preview:", error)));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PREVIEW_NODES.has(nodeData.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      drawPreview(this, ctx);
      return result;
    };
  },
});
