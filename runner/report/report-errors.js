// Loaded first, in <head>: records uncaught script errors in <html data-errors> (the browser test reads it).
window.reportErrors = [];
window.addEventListener("error", function (e) {
  window.reportErrors.push(String(e.message || e));
  document.documentElement.setAttribute("data-errors", JSON.stringify(window.reportErrors));
});
