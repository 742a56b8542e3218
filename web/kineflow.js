// KineFlow frontend extension for ComfyUI's canvas.
//
// HunyuanVideo latents need frame counts of the form 4k+1 (the causal VAE compresses 4 frames into one latent
// frame after the first) and sizes that are multiples of 16, while AnimateDiff (sd15) latents take any frame
// count. The frames widget therefore has step 1, and this extension snaps it to 4k+1 only when the node's
// latent_format is hunyuan_video; it also shows the resulting latent shape under the node.

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
