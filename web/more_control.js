// More Control's page extension: marks the pack's nodes (MC_*) with the pack's colours so they
// stand out in a graph, behind a setting (Settings > More Control). Help pages for the nodes are
// served from web/docs/<NodeId>.md and shown by ComfyUI's own node help.
import { app } from "../../scripts/app.js";

const PREFIX = "MC_";
const SETTING = "MoreControl.ColorNodes";
const COLORS = { color: "#2a4858", bgcolor: "#1d3442" };  // title bar, body

function isPackNode(node) {
  const type = node?.comfyClass ?? node?.type ?? "";
  return typeof type === "string" && type.startsWith(PREFIX);
}

function colorsEnabled() {
  try {
    return app.extensionManager?.setting?.get(SETTING) ?? true;
  } catch {
    return true;
  }
}

function paint(node, on) {
  if (on) {
    // A colour the user or the workflow chose wins.
    node.color ??= COLORS.color;
    node.bgcolor ??= COLORS.bgcolor;
  } else if (node.color === COLORS.color && node.bgcolor === COLORS.bgcolor) {
    delete node.color;
    delete node.bgcolor;
  }
}

app.registerExtension({
  name: "MoreControl.NodeStyle",
  settings: [
    {
      id: SETTING,
      category: ["More Control", "Appearance", "Colour the More Control nodes"],
      name: "Colour the More Control (MC_) nodes",
      tooltip: "New MC_ nodes get the pack's colours; a colour chosen in the workflow is kept.",
      type: "boolean",
      defaultValue: true,
      onChange(value) {
        for (const node of app.graph?.nodes ?? []) if (isPackNode(node)) paint(node, value);
        app.graph?.setDirtyCanvas(true, true);
      },
    },
  ],
  nodeCreated(node) {
    if (isPackNode(node) && colorsEnabled()) paint(node, true);
  },
});
