// The sign-in page: a token and a portal view id, then the presenter or the
// viewer page. A `#token=…&view=…` fragment pre-fills it.

import { signInForm } from './app.js';

const hash = new URLSearchParams(location.hash.slice(1));
const form = signInForm({ view: hash.get('view') || 'demo' });
if (hash.has('token')) {
  form.querySelector('[name=token]').value = hash.get('token');
  history.replaceState(null, '', location.pathname);
}
document.querySelector('#app').append(form);
