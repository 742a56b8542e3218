// In a running ComfyUI's real frontend: check that KineFlow's web extension is registered and snaps the
// Empty Video Latent widgets (frames to 4k+1 for hunyuan_video only, sizes to multiples of 16).
// Prints JSON. usage: KINEFLOW_COMFYUI_URL=http://127.0.0.1:8188 node web_extension.js
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] });
  const page = await browser.newPage();
  await page.goto(process.env.KINEFLOW_COMFYUI_URL, { waitUntil: 'networkidle', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  const result = await page.evaluate(() => {
    const node = window.LiteGraph.createNode('KineFlowEmptyVideoLatent');
    window.app.graph.add(node);
    const widget = (name) => node.widgets.find((w) => w.name === name);
    const set = (name, value) => { widget(name).value = value; widget(name).callback(value); return widget(name).value; };
    return {
      extensions: window.app.extensions.map((e) => e.name).filter((n) => n.startsWith('KineFlow')),
      hunyuan_frames_10: set('frames', 10),
      width_70: set('width', 70),
      sd15_frames_10: (widget('latent_format').value = 'sd15', set('frames', 10)),
    };
  });
  console.log(JSON.stringify(result));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
