// The explorer's pricing card on the customer page: cost to date and the invoice preview
// (docs/pricing.md). explorer.js announces each rendered customer page with an
// "explorer:customer" event; this file asks GET /invoices/{customer} for the invoice of the
// billing period holding now, and shows its lines. Amounts stay exact: numbers are read
// from the JSON text (JSON.parse's source text), never through a float.
(() => {
  "use strict";
  let shown = 0; // the latest render wins when customers change quickly

  function exactJson(text) {
    return JSON.parse(text, (key, value, context) =>
      typeof value === "number" && context && context.source !== undefined ? context.source : value);
  }
  function node(tag, attrs, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") element.textContent = value;
      else if (value !== null && value !== undefined) element.setAttribute(name, value);
    }
    for (const child of children) if (child) element.append(child);
    return element;
  }
  function day(ms, zone) {
    return new Date(Number(ms)).toLocaleDateString("en-CA", { timeZone: zone || "UTC" });
  }
  function card() {
    let box = document.getElementById("customer-invoice");
    if (!box) {
      box = node("div", { class: "card", id: "customer-invoice" });
      const view = document.getElementById("customer-view");
      view.insertBefore(box, view.children[1] || null);
    }
    return box;
  }

  async function render(customer) {
    const mine = ++shown;
    const box = card();
    box.removeAttribute("data-total");
    box.dataset.state = "loading";
    let invoice = null;
    let problem = null;
    try {
      const answer = await window.explorer.api("GET",
        `/invoices/${encodeURIComponent(customer)}?atMs=${Date.now()}`);
      invoice = exactJson(answer.text);
    } catch (error) {
      problem = error.status === 404 ? `No plan bills ${customer} this month.` : error.message;
    }
    if (mine !== shown) return;
    const head = node("div", { class: "card-head" }, node("h2", { text: "Cost to date" }));
    if (problem !== null) {
      box.replaceChildren(head, node("p", { class: "muted", text: problem }));
      box.dataset.state = "none";
      return;
    }
    const zone = (window.explorer.state && window.explorer.state.tz) || "UTC";
    head.append(node("span", { class: "muted", text:
      `plan ${invoice.planId} v${invoice.planVersion} · ${day(invoice.periodStartMs, zone)} to ` +
      `${day(Number(invoice.periodEndMs) - 1, zone)} · ${invoice.status}` }));
    const rows = invoice.lines.map((line) => node("tr", {
      class: "invoice-line", "data-kind": line.kind, "data-charge": line.chargeId ?? "",
      "data-quantity": line.quantity, "data-amount": line.amount },
    node("td", { text: line.kind }), node("td", { text: line.chargeId ?? line.description }),
    node("td", { class: "num", text: line.quantity }),
    node("td", { class: "num", text: `${line.amount} ${invoice.currency}` })));
    const table = node("table", { class: "invoice" },
      node("thead", {}, node("tr", {}, node("th", { text: "line" }), node("th", { text: "charge" }),
        node("th", { class: "num", text: "quantity" }), node("th", { class: "num", text: "amount" }))),
      node("tbody", {}, ...rows));
    box.replaceChildren(head,
      node("div", { class: "total", text: `${invoice.total} ${invoice.currency}` }), table);
    box.dataset.total = invoice.total;
    box.dataset.currency = invoice.currency;
    box.dataset.state = "ready";
  }

  document.addEventListener("explorer:customer", (event) => { render(event.detail.customer); });
})();
