// More Control: the turns of MC_IterativeEdit / MC_IterativeComposition as a strip on the node, drawn
// as each turn finishes. The server sends "more_control.turn" events ({node, turn, turns, image: a
// small PNG data URL}) from nodes/glue/composition.py; a new run of the node clears the strip.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "more_control.turn";
const TYPES = new Set(["MC_IterativeEdit", "MC_IterativeComposition"]);
const THUMB = 64;
const GAP = 4;

function drawStrip(node, ctx) {
  const strip = node.mcTurns;
  if (!strip || !strip.images.length) return;
  const top = node.size[1] - THUMB - GAP - 14;
  ctx.save();
  ctx.fillStyle = "#aaa";
  ctx.font = "11px sans-serif";
  ctx.fillText(`turn ${strip.done} of ${strip.turns}`, GAP, top - 2);
  strip.images.forEach((img, i) => {
    const x = GAP + i * (THUMB + GAP);
    if (x + THUMB > node.size[0]) return;
    if (img.complete) ctx.drawImage(img, x, top + 2, THUMB, THUMB);
    ctx.strokeStyle = "#666";
    ctx.strokeRect(x, top + 2, THUMB, THUMB);
  });
  ctx.restore();
}

app.registerExtension({
  name: "MoreControl.TurnStrip",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TYPES.has(nodeData?.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      drawStrip(this, ctx);
      return r;
    };
  },
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node)) ?? app.graph?.getNodeById?.(detail?.node);
      if (!node) return;
      if (!node.mcTurns || detail.turn === 0) node.mcTurns = { images: [], turns: detail.turns, done: 0 };
      const img = new Image();
      img.onload = () => app.graph.setDirtyCanvas(true, false);
      img.src = detail.image;
      node.mcTurns.images[detail.turn] = img;
      node.mcTurns.done = detail.turn + 1;
      const width = GAP + detail.turns * (THUMB + GAP);
      const height = node.computeSize ? node.computeSize()[1] + THUMB + 24 : node.size[1];
      node.setSize([Math.max(node.size[0], Math.min(width, 900)), Math.max(node.size[1], height)]);
      app.graph.setDirtyCanvas(true, false);
    });
  },
});
