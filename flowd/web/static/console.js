// flowd console: refreshes a running flow's page in place (the page reads the same
// without this script; it then reloads itself every two seconds instead).
"use strict";
(function () {
  document.documentElement.setAttribute("data-js", "on");
  var box = document.getElementById("flow");
  if (!box || !box.dataset.live) { return; }
  var ACTIVE = { INIT: true, RUNNING: true, WAITING: true };
  var url = box.dataset.live;
  var delay = 700;

  function state() {
    var article = box.querySelector("article.flow");
    return article ? article.dataset.state : box.dataset.state;
  }

  function poll() {
    if (!ACTIVE[state()]) { return; }
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (html !== box.innerHTML) {
          var open = Array.prototype.map.call(box.querySelectorAll("details[open]"), function (d, i) { return i; });
          box.innerHTML = html;
          var all = box.querySelectorAll("details");
          open.forEach(function (i) { if (all[i]) { all[i].open = true; } });
        }
        delay = 700;
        setTimeout(poll, delay);
      })
      .catch(function () {
        delay = Math.min(delay * 2, 10000);
        setTimeout(poll, delay);
      });
  }
  setTimeout(poll, delay);
})();
