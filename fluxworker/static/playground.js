// The playground uses only the public API: POST /generate with wait=false, GET /jobs/{id} for
// progress, GET /jobs for recent outputs, GET /outputs/{name} for images.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("apikey");
keyInput.value = localStorage.getItem("fluxworker-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("fluxworker-api-key", keyInput.value);
  loadRecent();
});

function headers(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || {};
    const where = error.field ? ` (${error.field})` : "";
    throw new Error(`${error.message || response.statusText}${where}`);
  }
  return body;
}

// Resolves once the image is shown; rejects when it cannot be loaded.
function loaded(img, src) {
  return new Promise((resolve, reject) => {
    img.addEventListener("load", () => resolve(src), { once: true });
    img.addEventListener("error", () => reject(new Error(`cannot load ${img.alt}`)), { once: true });
    img.src = src;
  });
}

// Images need the API key too when one is set, so they are fetched and shown from a blob URL.
// Returns the URL the image is shown from: the one to open in a new tab (the image's own URL
// would answer 401 there, without the key).
async function showImage(img, url) {
  if (!keyInput.value.trim()) return loaded(img, url);
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`${url}: ${(body.error && body.error.message) || response.statusText} (${response.status})`);
  }
  return loaded(img, URL.createObjectURL(await response.blob()));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function follow(id) {
  const bar = $("progress");
  bar.hidden = false;
  const deadline = Date.now() + 30 * 60 * 1000;
  while (Date.now() < deadline) {
    const state = await api(`/jobs/${encodeURIComponent(id)}`);
    if (state.status === "done") return state;
    if (state.status === "failed") throw new Error(`${state.error.message} [${state.error.code}]`);
    if (state.status === "queued") {
      setStatus(`Queued, position ${state.position}`);
      bar.removeAttribute("value");
    } else {
      setStatus(`Running: step ${state.step} of ${state.total ?? "?"}`);
      bar.max = state.total || 1;
      bar.value = state.step || 0;
    }
    await sleep(250);
  }
  throw new Error("no result after 30 minutes");
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("generate");
  button.disabled = true;
  const job = {
    prompt: $("prompt").value,
    width: Number($("width").value),
    height: Number($("height").value),
    num_inference_steps: Number($("steps").value),
    performance_mode: $("mode").value,
    no_text: $("no_text").checked,
    seed: $("seed").value === "" ? null : Number($("seed").value),
    wait: false,
  };
  try {
    setStatus("Sending...");
    const accepted = await api("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(job),
    });
    const done = await follow(accepted.id);
    const img = document.createElement("img");
    img.id = "result-image";
    img.alt = job.prompt;
    await showImage(img, done.url);
    $("result").replaceChildren(img);
    setStatus(`Done in ${done.timings.total_s.toFixed(2)} s, seed ${done.seed}`);
    loadRecent();
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("progress").hidden = true;
    button.disabled = false;
  }
});

let recentBlobs = [];

async function loadRecent() {
  try {
    const { jobs } = await api("/jobs?status=done&limit=12");
    const shown = [];
    const figures = await Promise.all(jobs.map(async (job) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = job.id;
      img.title = `seed ${job.seed ?? "-"}`;
      const caption = document.createElement("figcaption");
      try {
        const src = await showImage(img, job.url);
        shown.push(src);
        img.addEventListener("click", () => window.open(src, "_blank"));
        caption.textContent = `${job.width}x${job.height}, seed ${job.seed ?? "-"}`;
      } catch (error) {
        caption.textContent = `${job.id}: ${error.message}`;
        caption.className = "error";
      }
      figure.append(img, caption);
      return figure;
    }));
    $("recent").replaceChildren(...figures);
    recentBlobs.forEach((url) => URL.revokeObjectURL(url));
    recentBlobs = shown.filter((url) => url.startsWith("blob:"));
  } catch (error) {
    $("recent").textContent = `Cannot list outputs: ${error.message}`;
  }
}

loadRecent();
