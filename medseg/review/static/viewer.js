// medseg review: the per-case viewer (NiiVue) and the verdict / correction forms.
// Data comes from /api/case/<case>; every value from it is inserted with textContent, never as HTML.
// window.medsegViewer exposes the state (NiiVue instance, readiness, time to first image) to tests.
'use strict';
(function () {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const CASE = meta('medseg-case');
  const TOKEN = meta('medseg-token');
  const READ_ONLY = meta('medseg-read-only') === '1';
  const enc = encodeURIComponent;
  const $ = (id) => document.getElementById(id);
  // Window presets as [lowest, highest] HU shown: width W and level L give [L - W/2, L + W/2].
  const WINDOWS = { abdomen: [-160, 240], bone: [-500, 1300], lung: [-1350, 150] };
  const state = {
    nv: null, data: null, visible: {}, opacity: 0.6, full: false, editing: false, overlays: {},
    ready: false, firstImageMs: null, error: null,
  };
  window.medsegViewer = state;

  function el(tag, attrs, content) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (content !== undefined) node.textContent = content;
    return node;
  }
  function status(id, message, bad) {
    $(id).textContent = message;
    $(id).className = bad ? 'bad' : 'good';
  }

  async function post(url, body, type) {
    const response = await fetch(url, {
      method: 'POST', body, credentials: 'same-origin',
      headers: { 'X-Review-Token': TOKEN, 'Content-Type': type },
    });
    let payload = {};
    try { payload = await response.json(); } catch (e) { payload = { error: response.statusText }; }
    return { ok: response.ok, status: response.status, payload };
  }

  function labelColormap(visible) {
    const labels = state.data.labels;
    const max = Math.max(1, ...labels.map((l) => l.value));
    const cm = { R: [], G: [], B: [], A: [], I: [], labels: [] };
    for (let i = 0; i <= max; i++) {
      cm.R.push(0); cm.G.push(0); cm.B.push(0); cm.A.push(0); cm.I.push(i); cm.labels.push('');
    }
    for (const l of labels) {
      [cm.R[l.value], cm.G[l.value], cm.B[l.value]] = l.rgb;
      cm.A[l.value] = visible(l) ? 255 : 0;
      cm.labels[l.value] = l.name;
    }
    return cm;
  }

  function applyLabels() {
    const nv = state.nv;
    if (nv.volumes.length < 2) return;
    nv.volumes[0].cal_min = Number($('window-min').value);
    nv.volumes[0].cal_max = Number($('window-max').value);
    nv.volumes[1].setColormapLabel(labelColormap((l) => state.visible[l.value]));
    nv.volumes[1].opacity = state.editing ? 0 : state.opacity;
    nv.updateGLVolume();
  }

  function applyWindow() {
    const nv = state.nv;
    const lo = Number($('window-min').value);
    const hi = Number($('window-max').value);
    if (!nv.volumes.length || !(hi > lo)) return;
    nv.volumes[0].cal_min = lo;
    nv.volumes[0].cal_max = hi;
    nv.updateGLVolume();
  }

  async function loadVolumes(full) {
    const nv = state.nv;
    const t0 = performance.now();
    const copy = (kind) => `/display/${enc(CASE)}/${kind}.nii`;
    const lo = Number($('window-min').value);
    const hi = Number($('window-max').value);
    await nv.loadVolumes([
      { url: copy(full ? 'scan_full' : 'scan_display'), colormap: 'gray', cal_min: lo, cal_max: hi },
      { url: copy(full ? 'labels_scan_grid' : 'labels_display'), opacity: state.opacity },
    ]);
    state.full = full;
    state.overlays = {};
    for (const box of document.querySelectorAll('.overlay-toggle')) box.checked = false;
    applyLabels(); // one update of the GL volumes: window and label colours together
    const back = nv.volumes[0].hdr;
    $('status').textContent = `${full ? 'full resolution' : 'display copy'} ${back.dims[1]}×${back.dims[2]}×${back.dims[3]}`
      + ` (${(performance.now() - t0).toFixed(0)} ms)` + (state.data.scan_available ? '' : ' · scan not found: mask only');
    $('full-res').disabled = full;
  }

  function renderOrgans() {
    const list = $('organs');
    list.replaceChildren();
    for (const l of state.data.labels) {
      state.visible[l.value] = true;
      const box = el('input', { type: 'checkbox', class: 'organ-toggle', 'data-value': String(l.value) });
      box.checked = true;
      box.addEventListener('change', () => { state.visible[l.value] = box.checked; applyLabels(); });
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = `rgb(${l.rgb.join(',')})`;
      const label = el('label');
      label.append(box, swatch, document.createTextNode(` ${l.name} (${l.value})`));
      const li = el('li');
      li.append(label);
      list.append(li);
      $('pen-label').append(el('option', { value: String(l.value) }, l.name));
    }
    $('pen-label').append(el('option', { value: '0' }, 'erase (background)'));
  }

  function renderOverlays() {
    const list = $('overlays');
    if (!state.data.overlays.length) return;
    list.replaceChildren();
    for (const o of state.data.overlays) {
      const box = el('input', { type: 'checkbox', class: 'overlay-toggle', 'data-file': o.file });
      box.addEventListener('change', () => toggleOverlay(o, box.checked));
      const label = el('label');
      label.append(box, document.createTextNode(` ${o.name}`));
      const li = el('li');
      li.append(label);
      list.append(li);
    }
  }

  async function toggleOverlay(o, on) {
    const nv = state.nv;
    if (on && !state.overlays[o.file]) {
      state.overlays[o.file] = await nv.addVolumeFromUrl({
        url: `/files/${enc(o.file)}`, colormap: o.colormap, opacity: 0.5, cal_min: o.range[0], cal_max: o.range[1],
      });
    } else if (!on && state.overlays[o.file]) {
      nv.removeVolume(state.overlays[o.file]);
      delete state.overlays[o.file];
    }
  }

  function renderFlags() {
    const list = $('flags');
    list.replaceChildren();
    if (!state.data.flags.length) list.append(el('li', { class: 'muted' }, 'no flags'));
    for (const f of state.data.flags) {
      const li = el('li', { class: `sev-${f.severity}` });
      li.append(document.createTextNode(f.message + ' '));
      if (f.location) {
        const jump = el('button', { type: 'button', class: 'flag-jump', 'data-code': f.code }, 'go to');
        jump.addEventListener('click', () => jumpTo(f.location));
        li.append(jump);
      }
      list.append(li);
    }
  }

  function jumpTo(mm) {
    const nv = state.nv;
    nv.scene.crosshairPos = nv.mm2frac(mm);
    nv.createOnLocationChange();
    nv.drawScene();
  }

  function renderState() {
    const s = state.data.state;
    for (const box of document.querySelectorAll('input[name=verdict]')) {
      box.checked = box.value === s.verdict;
      box.disabled = READ_ONLY;
    }
    if (s.version > 0) $('comment').value = s.comment || '';
    const history = $('history');
    history.replaceChildren();
    for (const h of state.data.history) {
      const what = h.action === 'correction' ? `correction saved (${h.correction})` : (h.verdict || '').replace('_', ' ');
      history.append(el('li', { 'data-version': String(h.version) }, `${h.time} · ${h.reviewer}: ${what}${h.comment ? ' — ' + h.comment : ''}`));
    }
  }

  async function saveVerdict() {
    const choice = document.querySelector('input[name=verdict]:checked');
    const reviewer = $('reviewer').value.trim();
    if (!choice) return status('verdict-status', 'choose a verdict first', true);
    if (!reviewer) return status('verdict-status', 'enter your name first', true);
    localStorage.setItem('medseg-reviewer', reviewer);
    const body = JSON.stringify({
      verdict: choice.value, comment: $('comment').value, reviewer, version: state.data.state.version,
    });
    const r = await post(`/api/case/${enc(CASE)}/verdict`, body, 'application/json');
    if (!r.ok) return status('verdict-status', r.payload.error || `refused (${r.status})`, true);
    state.data.state = r.payload.state;
    state.data.history = r.payload.history;
    renderState();
    status('verdict-status', `saved (version ${r.payload.state.version})`, false);
  }

  async function startEditing() {
    const nv = state.nv;
    status('correction-status', 'loading full resolution…', false);
    if (!state.full) await loadVolumes(true);
    nv.setDrawColormap(labelColormap(() => true));
    const ok = await nv.loadDrawingFromUrl(`/display/${enc(CASE)}/labels_scan_grid.nii`);
    if (!ok) return status('correction-status', 'the label map does not fit the scan grid', true);
    state.editing = true;
    applyLabels();
    nv.setDrawOpacity(Math.max(state.opacity, 0.5));
    nv.opts.penSize = 3;
    nv.setPenValue(Number($('pen-label').value), false);
    nv.setDrawingEnabled(true);
    $('save-correction').disabled = false;
    $('edit-start').disabled = true;
    status('correction-status', 'drag on a slice to paint the chosen label', false);
  }

  async function saveCorrection() {
    const reviewer = $('reviewer').value.trim();
    if (!reviewer) return status('correction-status', 'enter your name first', true);
    const bytes = await state.nv.saveImage({ filename: '', isSaveDrawing: true });
    const query = `version=${state.data.state.version}&reviewer=${enc(reviewer)}&comment=${enc($('comment').value)}`;
    const r = await post(`/api/case/${enc(CASE)}/correction?${query}`, bytes, 'application/octet-stream');
    if (!r.ok) return status('correction-status', r.payload.error || `refused (${r.status})`, true);
    state.data.state = r.payload.state;
    state.data.history = r.payload.history;
    renderState();
    status('correction-status', `saved ${r.payload.file} (version ${r.payload.state.version})`, false);
  }

  function wire() {
    const nv = state.nv;
    const types = { 'view-axial': 0, 'view-coronal': 1, 'view-sagittal': 2, 'view-multi': 3 };
    for (const [id, type] of Object.entries(types)) $(id).addEventListener('click', () => nv.setSliceType(type));
    $('window-preset').addEventListener('change', () => {
      const w = WINDOWS[$('window-preset').value];
      if (w) [$('window-min').value, $('window-max').value] = w;
      applyWindow();
    });
    for (const id of ['window-min', 'window-max']) {
      $(id).addEventListener('change', () => { $('window-preset').value = 'custom'; applyWindow(); });
    }
    $('opacity').addEventListener('input', () => {
      state.opacity = Number($('opacity').value);
      if (state.editing) nv.setDrawOpacity(state.opacity); else applyLabels();
    });
    $('full-res').addEventListener('click', () => loadVolumes(true));
    $('save-verdict').addEventListener('click', saveVerdict);
    $('edit-start').addEventListener('click', startEditing);
    $('pen-label').addEventListener('change', () => nv.setPenValue(Number($('pen-label').value), false));
    $('save-correction').addEventListener('click', saveCorrection);
    $('reviewer').value = localStorage.getItem('medseg-reviewer') || '';
    nv.onLocationChange = (d) => { $('location').textContent = d.string || ''; };
  }

  async function main() {
    const response = await fetch(`/api/case/${enc(CASE)}`);
    state.data = await response.json();
    const nv = new niivue.Niivue({
      isRadiologicalConvention: true, backColor: [0, 0, 0, 1], dragAndDropEnabled: false,
      show3Dcrosshair: false, isColorbar: false, crosshairColor: [1, 1, 0, 0.6], multiplanarShowRender: 0,
    });
    state.nv = nv;
    await nv.attachToCanvas($('gl'));
    nv.setRadiologicalConvention(true);
    nv.setSliceType(0);
    renderOrgans();
    renderOverlays();
    renderFlags();
    renderState();
    wire();
    await loadVolumes(false);
    requestAnimationFrame(() => {
      state.firstImageMs = performance.now();
      state.ready = true;
      document.body.dataset.ready = '1';
    });
  }

  window.addEventListener('DOMContentLoaded', () => {
    main().catch((e) => {
      state.error = String(e);
      $('status').textContent = `error: ${e}`;
      document.body.dataset.ready = 'error';
    });
  });
})();
