// In a running ComfyUI's real frontend: load a UI workflow, queue it, and read back from the canvas what the
// KineFlow Sampler node shows while (and after) it samples. Prints JSON: the preview messages and `executing`
// events as the page received them, and captures of the node's preview area every 30 ms (time, mean colour and a
// fingerprint of the pixels). Used by tests/test_comfyui_live.py.
// usage: KINEFLOW_COMFYUI_URL=http://127.0.0.1:8188 node sampler_preview.js WORKFLOW.json
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on('pageerror', (e) => console.error('pageerror', e.message));
  await page.goto(process.env.KINEFLOW_COMFYUI_URL, { waitUntil: 'networkidle', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.comfyAPI?.api?.api, null, { timeout: 120000 });
  const workflow = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const result = await page.evaluate(async (workflow) => {
    const { app } = window;
    const api = window.comfyAPI.api.api;
    const start = performance.now();
    const now = () => performance.now() - start;
    const events = [];
    api.addEventListener('kineflow.preview', ({ detail }) => events.push({ t: now(), type: 'preview', node: String(detail.node), frames: detail.frames, width: detail.width, height: detail.height, frame_ms: detail.frame_ms }));
    api.addEventListener('executing', ({ detail }) => events.push({ t: now(), type: 'executing', node: detail == null ? null : String(detail) }));
    let promptId = null;
    let finished = null;
    api.addEventListener('execution_start', ({ detail }) => { promptId = detail.prompt_id; });
    api.addEventListener('execution_success', () => { finished = now(); });
    api.addEventListener('execution_error', ({ detail }) => { finished = now(); events.push({ t: now(), type: 'error', detail: JSON.stringify(detail).slice(0, 2000) }); });

    await app.loadGraphData(workflow);
    const sampler = app.graph.findNodesByType('KineFlowSampler')[0];
    // Bring the Sampler to the top left of the view at scale 1, clear of the frontend's side bar and menus.
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [120 - sampler.pos[0], 120 - sampler.pos[1]];
    app.canvas.setDirty(true, true);

    const canvas = app.canvas.canvas;
    const context = canvas.getContext('2d');
    const captures = [];
    const capture = () => {
      const preview = sampler.kineflowPreview;
      if (!preview?.rect) return;
      const ratio = canvas.width / canvas.clientWidth;
      const [x, y, w, h] = preview.rect;
      const inset = 3; // leave out the edges, where the scaled image blends with the node's background
      const left = Math.round((sampler.pos[0] + x + inset + app.canvas.ds.offset[0]) * app.canvas.ds.scale * ratio);
      const top = Math.round((sampler.pos[1] + y + inset + app.canvas.ds.offset[1]) * app.canvas.ds.scale * ratio);
      const width = Math.round((w - 2 * inset) * app.canvas.ds.scale * ratio);
      const height = Math.round((h - 2 * inset) * app.canvas.ds.scale * ratio);
      const pixels = context.getImageData(left, top, width, height).data;
      const sum = [0, 0, 0];
      let hash = 0;
      for (let i = 0; i < pixels.length; i += 4) {
        for (let c = 0; c < 3; c++) { sum[c] += pixels[i + c]; hash = (Math.imul(hash, 31) + pixels[i + c]) | 0; }
      }
      const count = pixels.length / 4;
      captures.push({ t: now(), frames: preview.frames.length, mean: sum.map((s) => s / count / 255), key: hash, size: [width, height] });
    };

    await app.queuePrompt(0, 1);
    const deadline = now() + 300000;
    while (finished === null && now() < deadline) { capture(); await new Promise((r) => setTimeout(r, 30)); }
    // Keep watching the final preview for two full loops.
    const loop = sampler.kineflowPreview ? sampler.kineflowPreview.frames.length * sampler.kineflowPreview.frameMs : 0;
    const until = now() + 2 * loop + 500;
    while (now() < until) { capture(); await new Promise((r) => setTimeout(r, 30)); }
    return { prompt_id: promptId, finished, sampler_id: String(sampler.id), events, captures };
  }, workflow);
  console.log(JSON.stringify(result));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
