// Load each UI workflow into a running ComfyUI's real frontend and print the API prompts it exports
// (app.graphToPrompt), as JSON {file: prompt}. Used by tests/test_comfyui_live.py.
// usage: KINEFLOW_COMFYUI_URL=http://127.0.0.1:8188 node frontend_prompt.js WORKFLOW.json ...
const { chromium } = require('playwright-core');
const fs = require('fs');
(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'] });
  const page = await browser.newPage();
  page.on('pageerror', e => console.error('pageerror', e.message));
  await page.goto(process.env.KINEFLOW_COMFYUI_URL, { waitUntil: 'networkidle', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph, null, { timeout: 120000 });
  const out = {};
  for (const file of process.argv.slice(2)) {
    const wf = JSON.parse(fs.readFileSync(file, 'utf8'));
    const res = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const p = await window.app.graphToPrompt();
      return p.output;
    }, wf);
    out[file] = res;
  }
  console.log(JSON.stringify(out));
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
