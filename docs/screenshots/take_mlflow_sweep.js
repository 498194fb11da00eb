// The MLflow UI screenshot of docs/tracking.md (docs/screenshots/mlflow_sweep.png), taken in headless
// Chromium from a real sweep: the MLflow store of tests/track/test_sweep_tracking.py (4 variants of one
// tiny phantom fold each, real scheduler children), served by
//   mlflow ui --backend-store-uri sqlite:///PATH/mlflow.db --host 127.0.0.1 --port 5055
// Run: npm i playwright-core && node docs/screenshots/take_mlflow_sweep.js (Debian's /usr/bin/chromium).
const { chromium } = require('playwright-core');
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1500, height: 640 } });
  await page.goto('http://127.0.0.1:5055/#/experiments/2/runs?viewType=ACTIVE_ONLY', { waitUntil: 'networkidle' });
  await page.waitForTimeout(3000);
  const close = page.locator('button[aria-label="Close"]');
  if (await close.count()) { await close.first().click().catch(() => {}); }
  await page.waitForTimeout(500);
  const expand = page.locator('[data-testid="runs-table"] button, .ag-row button').first();
  const plus = page.getByRole('button', { name: /expand/i });
  if (await plus.count()) { await plus.first().click(); } else { await expand.click().catch(() => {}); }
  await page.waitForTimeout(2000);
  await page.screenshot({ path: 'docs/screenshots/mlflow_sweep.png' });
  await browser.close();
})();
