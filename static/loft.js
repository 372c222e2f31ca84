// Keeps the active tab visible in the tab bar on narrow screens, where the bar scrolls sideways.
function loftShowActiveTab() {
  var active = document.querySelector(".tab.active");
  if (active) active.scrollIntoView({ block: "nearest", inline: "nearest" });
}
document.addEventListener("htmx:afterSettle", loftShowActiveTab);
window.addEventListener("load", loftShowActiveTab);
window.addEventListener("resize", loftShowActiveTab);
