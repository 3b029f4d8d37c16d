// buildq status page: refresh the live parts of a page in place, and confirm actions.
// No library, nothing inline (the Content-Security-Policy allows scripts from this server only).
"use strict";

(function () {
  // An element with data-refresh="URL" is replaced every data-interval seconds by the HTML at
  // URL (the same template, rendered by the server, so escaping happens in one place).
  function follow(element) {
    var every = 1000 * (parseFloat(element.dataset.interval) || 5);
    var busy = false;
    var timer = null;
    function tick() {
      if (busy || document.hidden) return;
      busy = true;
      fetch(element.dataset.refresh, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.text();
        })
        .then(function (html) {
          element.innerHTML = html;
          element.classList.remove("stale");
          element.dataset.refreshedAt = String(Date.now());
          // A finished build's page has nothing more to show: stop asking.
          if (element.querySelector("[data-final]")) window.clearInterval(timer);
        })
        .catch(function () {
          element.classList.add("stale");
        })
        .finally(function () {
          busy = false;
        });
    }
    timer = window.setInterval(tick, every);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) tick();
    });
  }

  document.querySelectorAll("[data-refresh]").forEach(follow);

  // Forms that change something ask first (the question is in data-confirm).
  document.addEventListener("submit", function (event) {
    var question = event.target.dataset && event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
