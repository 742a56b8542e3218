// KineFlow frontend extension for ComfyUI's canvas.
//
// Video latents need frame counts of the form 4k+1 (the causal VAE compresses 4 frames into one latent frame
// after the first) and sizes that are multiples of 16. ComfyUI's number widgets round to multiples of their
// step, which would turn 25 frames into 24, so this extension snaps the values the way the backend expects
// and shows what the settings mean (duration, latent shape) under the node.

import { app } from "../../scripts/app.js";

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

function describe(node) {
  const get = (name) => node.widgets?.find((w) => w.name === name)?.value;
  const frames = get("frames");
  const width = get("width");
  const height = get("height");
  if (frames === undefined || width === undefined || height === undefined) return "";
  const latentFrames = (frames - 1) / 4 + 1;
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
        const snap = FRAME_WIDGETS.has(widget.name) ? snapFrames : SIZE_WIDGETS.has(widget.name) ? snapSize : null;
        if (!snap) continue;
        const original = widget.callback;
        widget.callback = function (value, ...rest) {
          widget.value = snap(value);
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
